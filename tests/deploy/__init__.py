"""Tests of deploy/: the Kubernetes manifests, the image, the docs that explain them."""
