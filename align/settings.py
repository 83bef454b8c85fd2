"""Settings of the align job, read from the environment (prefix `SECONDSTAGE_`, like serve).

Extends `CommonSettings`, so align finds the same Redis, var/ directory and base model as the server.
Defaults are sized for the demo model on a small CPU machine: ~10 feedback rows train in well under two minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from core.settings import CommonSettings

DpoLoss = Literal[
    "sigmoid",
    "sigmoid_norm",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
]
"""TRL DPOConfig.loss_type values for the preference term ('sft' is the separate sft_weight term)."""


class AlignSettings(CommonSettings):
    # --- what to train on
    min_feedback: int = Field(
        default=4,
        ge=1,
        description="Fewest usable training rows (DPO pairs + KTO rows) worth a run; fewer → nothing happens.",
    )
    max_rows_per_user: int = Field(
        default=50,
        ge=1,
        description="Most feedback entries one user may contribute to one run (a cap against poisoning).",
    )
    max_rows_per_run: int = Field(
        default=10_000,
        ge=1,
        description="Most feedback entries and policy pairs one run reads (a page at a time, never the whole "
        "stream); the rest stays in the streams for the next runs. Bounds a run's memory and training time.",
    )
    missing_completion_wait_s: float = Field(
        default=3600.0,
        ge=0,
        description="Feedback whose completion is not in Redis yet (its replica's writer is backlogged or "
        "spooling, or Redis was down when it was accepted) stays pending this long for later runs; after "
        "that it is dropped as missing_completion.",
    )
    max_refusals: int = Field(
        default=3,
        ge=1,
        description="Gate refusals after which a feedback entry or policy pair is taken out of training: "
        "acknowledged and dead-lettered (`secondstage align refusals` lists them). A refused run leaves its "
        "feedback for the next run, which trains on it again with whatever arrived since; an entry that was in "
        "this many refused runs is likely what the gate refuses, and retrying it forever would repeat the "
        "refusal (align/refusals.py).",
    )
    include_policy_pairs: bool = Field(
        default=True, description="Also train on preference pairs derived from enforced output-policy rewrites."
    )
    consumer_name: str = Field(
        default="align", description="Consumer name in the align consumer group (pending entries are re-read under it)."
    )

    # --- the adapter
    lora_rank: int = Field(default=8, ge=1, le=16, description="LoRA rank r; at most the server's max_lora_rank (16).")
    lora_alpha: int = Field(default=16, ge=1, description="LoRA alpha; the adapter's update is scaled by alpha / r.")
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input during training.")
    lora_targets: list[str] = Field(
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Module names a fresh adapter puts LoRA weights on (peft target_modules; a run that continues "
        "from a parent keeps the parent's). Default: every linear layer of a Llama block (vLLM serves all of them). "
        "Fewer targets change less of what the model computes (docs/performance.md, closed loop: measured).",
    )

    # --- training
    learning_rate: float = Field(
        default=5e-4,
        gt=0.0,
        description="AdamW learning rate for the LoRA weights. Each run refines the promoted version, so a small step "
        "per run adds up over runs; 2e-3 with 6 epochs (the old default) taught a house style in one run and broke "
        "the answers' content and termination (docs/performance.md, closed loop).",
    )
    epochs: float = Field(
        default=3.0,
        gt=0.0,
        description="Passes over the DPO phase's rows (its pairs, or with dpo_weight 0 its SFT rows: chosen and "
        "liked answers); ignored when max_steps > 0.",
    )
    kto_epochs: float = Field(
        default=2.0, gt=0.0, description="Passes over the KTO rows (thumbs are a coarse signal: fewer passes)."
    )
    kto_learning_rate: float | None = Field(
        default=None, gt=0.0, description="Learning rate of the KTO phase; unset = learning_rate."
    )
    max_steps: int = Field(default=0, ge=0, description="Optimizer steps per phase; 0 = derive from epochs.")
    min_dpo_steps: int = Field(
        default=64,
        ge=0,
        description="Fewest optimizer steps of the DPO phase (SFTTrainer's when dpo_weight is 0) when they are "
        "derived from epochs: a handful of "
        "corrections at the small default learning rate would otherwise move the model too little to show in its "
        "answers (8 pairs × 3 epochs is 12 steps). Not applied to KTO, whose undesirable rows push answers down.",
    )
    batch_size: int = Field(default=2, ge=2, description="Rows per step (KTO needs ≥ 2 for its KL estimate).")
    beta: float = Field(default=0.1, gt=0.0, description="DPO/KTO β: how far the policy may move from the reference.")
    sft_weight: float = Field(
        default=1.0,
        ge=0.0,
        description="Weight of the NLL-on-chosen term of the DPO phase (TRL DPO loss_type 'sft'; with dpo_weight 0 "
        "it scales the loss of the SFTTrainer that runs the phase); it makes corrections show up in greedy answers, "
        "not only in the preference margin.",
    )
    dpo_weight: float = Field(
        default=0.0,
        ge=0.0,
        description="Weight of DPO's preference term (TRL loss_type `dpo_loss`); 0 (the default) trains on the "
        "chosen answers alone through the SFT term, with TRL's SFTTrainer (no reference model and no pass over the "
        "rejected answers: a third of the time per step, docs/performance.md). The term pushes down every token of the "
        "rejected answer after it parts from the chosen one: when a user corrects the content of an answer that "
        "already has the wanted style, that pushes the style down too (docs/performance.md, closed loop: 200 "
        "sign-off events, round 2 kept the style on 87.5% of held-out prompts with 1.0, 97.5% with 0). Set it > 0 "
        "to push rejected answers (e.g. what an output policy rewrote) down, not only the chosen ones up.",
    )
    liked_as_sft: bool = Field(
        default=True,
        description="Train liked answers (KTO-desirable rows: thumbs up, rating ≥ 4) as SFT rows inside the DPO "
        "phase instead of in the KTO phase before it: with dpo_weight 0 each is one more SFT row, else a pair whose "
        "chosen and rejected are the same answer, on which the preference term has no gradient and the SFT term "
        "(sft_weight) trains — rehearsal of "
        "the model's own good answers while the corrections train, rather than before them (a KTO phase of liked "
        "answers alone has no undesirable rows to contrast them with). The rows stay KTO rows for the gate and the "
        "manifest counts. False: the KTO phase trains them.",
    )
    kl_weight: float = Field(
        default=5.0,
        ge=0.0,
        description="Weight of a KL(reference ‖ new) term in the DPO phase when it runs as SFT (dpo_weight 0; with the "
        "preference term on, DPO's β holds the policy to its reference and this is not used): per completion "
        "token `kl_tokens` names, how far the next-token distribution moved from the adapter the phase started "
        "from (the parent version's, or the base model for a fresh adapter), or from the base model (kl_reference) "
        "— regularising toward that reference so "
        "that what the feedback does not ask to change stays put. 0 = no term. Default 5, with kl_tokens "
        "'leading' (docs/performance.md, 'The KL term on by default again'): on 200 sign-off events held-out "
        "content kept in round 1 rose offline from 70% to 85% (seed 0) and 82.5% (seed 1); in the closed loop it "
        "was 75-77.5% on seed 0 (no term: 62.5-75%; goal not met either way) and 85% on seed 1 (the goal in round "
        "1; no term: 70%, the goal in round 4), preferred 95-100%; "
        "tests/e2e/test_loop.py's 8 prefix corrections train as without the term (+0.061 similarity; 'agreed' "
        "held them to +0.037). About 35% more time per step (a second forward, for the parent).",
    )
    kl_tokens: Literal["rehearsal", "all", "agreed", "leading", "leading+rehearsal"] = Field(
        default="leading",
        description="Completion tokens the KL term (kl_weight) applies to: 'agreed' = those of any row where the "
        "answer's token is the one the parent ranks first (what a correction keeps of the parent's answer, not "
        "where it departs from it), "
        "'leading' = those of 'agreed' before the row's first token that is not the parent's first choice (the "
        "parent's own answer so far, in a context it writes itself; after a departure, e.g. a prefix style, the "
        "parent's distribution is a guess in a context it never writes, and the correction trains freely; the "
        "default), "
        "'leading+rehearsal' = 'leading' on the corrections and every token of the liked answers (a liked answer "
        "is the parent's own throughout, where 'leading' would stop at a near tie the server broke the other way; "
        "on the demo model with kl_reference 'parent' 'leading' held every liked token, metric dpo_liked_leading "
        "1.0, so it trained the same adapter: docs/performance.md, 'Are the liked answers held?'), "
        "'rehearsal' = those of the liked answers trained with liked_as_sft, 'all' = "
        "those of every row, corrections included (it holds back what the corrections teach: measured worse).",
    )
    kl_reference: Literal["parent", "base"] = Field(
        default="base",
        description="What the KL term (kl_weight) holds the adapter near, and whose first choices kl_tokens' "
        "'agreed'/'leading' masks compare with: 'parent' = the adapter as the phase starts (the parent version's, "
        "or the base model for a fresh adapter), 'base' = the base model without any adapter (no parent copy is "
        "made; the reference forward runs with the adapter disabled). Each round held to its parent only stays "
        "near the previous round, so drift can add up over rounds; 'base' anchors every round to the root, as "
        "RLHF holds the policy to the SFT model rather than its previous iterate. A fresh adapter (round 1, no KTO "
        "phase) starts as the base model, so both train the same adapter there. Default 'base': closed loop, 200 "
        "sign-off events a round, 5 rounds, seed 0, four runs each: 'parent' drifted from 75-80% held-out content "
        "kept in round 1 to 65-72.5% by round 5 (the goal, preferred ≥ 90% and kept ≥ 80%, met in 1 run of 4), "
        "'base' ended at 77.5-82.5% (the goal met in 4 of 4); seed 1 85-87.5% 'parent', 87.5-92.5% 'base'. With "
        "'base' the liked answers of round 2 on (the previous adapter's, sign-off included) depart from the base "
        "model where the style does, so 'leading' holds them up to there (metric dpo_liked_leading below 1).",
    )
    dpo_loss: DpoLoss = Field(
        default="sigmoid",
        description="TRL DPO loss type of the preference term: 'sigmoid' (DPO), 'sigmoid_norm' (per-token "
        "average margin, length-normalised), 'ipo', 'hinge', … (any DPOConfig.loss_type but 'sft').",
    )
    max_length: int = Field(
        default=512, ge=16, description="Longest tokenized prompt + completion; longer rows are cut."
    )
    seed: int = Field(default=0, description="Seed for LoRA init and data order (shares SECONDSTAGE_SEED with serve).")
    threads: int = Field(default=2, ge=1, description="torch CPU threads used for training and the gate.")

    # --- the gate
    gate_enabled: bool = Field(
        default=True, description="Evaluate the adapter before publishing; off only for debugging."
    )
    gate_min_margin_gain: float = Field(
        default=0.0,
        description="The trained adapter's mean log-prob margin (chosen − rejected) on the DPO pairs must exceed "
        "the parent's by more than this (nats).",
    )
    gate_min_improved_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Share of DPO pairs whose margin must improve over the parent's."
    )
    gate_max_rows: int = Field(
        default=64, ge=1, description="Most rows the gate evaluates (it runs on CPU, un-batched)."
    )

    # --- the gate on data the adapter never trained on (align/gate.py, align/split.py, align/regression.py)
    heldout_share: float = Field(
        default=0.2,
        ge=0.0,
        lt=1.0,
        description="Share of each run's feedback held out of training for the gate, picked by the sha256 of the "
        "completion id (stable across runs and ranks); 0 = none.",
    )
    gate_heldout_min_rows: int = Field(
        default=4,
        ge=1,
        description="Fewest held-out rows for the held-out checks to decide; with fewer they pass, say so in "
        "their note, and the other checks decide.",
    )
    gate_heldout_accuracy_tolerance: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="How far the new adapter's preference accuracy on held-out pairs (share whose chosen answer has "
        "the higher per-token log-prob) may fall below the parent's.",
    )
    gate_heldout_margin_tolerance: float = Field(
        default=0.0,
        ge=0.0,
        description="How far the new adapter's mean held-out margin (log p(chosen) − log p(rejected), nats) may "
        "fall below the parent's.",
    )
    regression_file: Path = Field(
        default=Path("evals/regression.yaml"),
        description="The operator's regression set (align/regression.py): prompts with must_contain / "
        "must_not_contain / reference / max_chars checks. The default file may be absent (the check is skipped); "
        "a file set explicitly must exist.",
    )
    gate_max_regressions: int = Field(
        default=0,
        ge=0,
        description="Regression-set checks the parent passed that the new adapter may fail.",
    )
    gate_anchor_count: int = Field(
        default=16,
        ge=0,
        description="Logged completions with positive or no negative feedback used as anchors (align/anchors.py).",
    )
    gate_anchor_scan: int = Field(
        default=2000,
        ge=1,
        description="Newest stream entries scanned for anchors (completions) and for judgements (feedback).",
    )
    gate_max_drift_nats: float = Field(
        default=0.5,
        ge=0.0,
        description="Most the mean per-token log-prob of the anchor answers may drop from the parent to the new "
        "adapter (nats/token).",
    )
    gate_max_new_tokens: int = Field(
        default=48,
        ge=4,
        description="Token budget of each greedy sample the gate generates (regression and anchor prompts); a "
        "sample that uses it all did not stop.",
    )
    gate_repeat_ngram: int = Field(
        default=3, ge=1, description="n of the n-grams counted for repetition loops in generated samples."
    )
    gate_max_repeat_fraction: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="A sample whose share of repeated n-grams (n-grams seen earlier in it) exceeds this is a loop.",
    )
    gate_length_blowup: float = Field(
        default=2.0,
        gt=1.0,
        description="A new sample longer than this many times the parent's answer to the same prompt (plus "
        "gate_length_slack_tokens) has blown up.",
    )
    gate_length_slack_tokens: int = Field(
        default=8, ge=0, description="Tokens allowed on top of the blow-up factor (short answers may grow a little)."
    )
    gate_max_degeneration_increase: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="How much the share of degenerate samples (loop, no stop, blow-up) may exceed the parent's.",
    )
    gate_max_violation_increase: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="How much the share of generated samples an output policy would block, redact or rewrite may "
        "exceed the parent's.",
    )
    gate_threads: int = Field(
        default=1,
        ge=1,
        description="torch CPU threads for the gate (training uses `threads`). Its forward passes are small (batches "
        "of ≤ 16 short rows on the demo model), where extra threads mostly add synchronisation: on a busy 2-core "
        "machine 1 thread ran the gate in ~10 s, 2 threads in 40-95 s.",
    )

    # --- the job
    lock_ttl_s: int = Field(
        default=3600,
        ge=10,
        description="Expiry of the Redis lock that keeps align runs one at a time (covers a crash).",
    )
    pushgateway_url: str | None = Field(
        default=None,
        description="Prometheus Pushgateway each run pushes its metrics to (job secondstage_align), e.g. "
        "http://pushgateway:9091; unset = no push. A failed push is logged and never fails the run.",
    )
