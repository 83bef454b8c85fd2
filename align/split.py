"""The held-out split: which feedback of a run never trains, so the gate can ask whether the adapter generalises.

A feedback item goes to the held-out side when the sha256 of its completion id, read as a number, falls in the
first `share` of the hash space (`bucket(completion_id) < share`). Keyed on the completion id, not the feedback
id, so every judgement of one completion (a thumbs and a correction, two users' votes) lands on the same side:
the adapter cannot learn a completion's answer from one vote and be graded on it through another. A hash, not a
random draw, so the split is the same in every run and on every process of a distributed run (ranks train on
the same rows without exchanging them), and a completion once held out stays held out when it is read again.

Policy pairs are not split: they come from the operator's own rules, not from users, and the policy-compliance
check of the gate already tests what they teach on generated samples.

Held-out feedback is consumed like the training feedback when the version publishes (acknowledged, listed in
the gate report as `heldout_feedback_ids`): it has done its job as evaluation data, and re-reading it in the
next run would grade the next version on data the gate already used to pick this one.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

from align.feedback import FeedbackBatch

_SPACE = float(2**64)


def bucket(completion_id: str) -> float:
    """Where `completion_id` falls in [0, 1): the first 8 bytes of its sha256 as a fraction of 2**64."""
    digest = hashlib.sha256(completion_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / _SPACE


def is_heldout(completion_id: str, share: float) -> bool:
    return bucket(completion_id) < share


@dataclass
class Split:
    """One run's feedback, split: `train` keeps the policy pairs, the ack list and the skip counts."""

    train: FeedbackBatch
    heldout: FeedbackBatch


def split_batch(batch: FeedbackBatch, share: float) -> Split:
    """Move the feedback whose completion is held out (`is_heldout`) into its own batch; see the module docstring.

    The original `batch` keeps everything and is what gets acknowledged; the two halves only feed the datasets.
    """
    train = FeedbackBatch(policy_pairs=list(batch.policy_pairs), to_ack=batch.to_ack, skipped=Counter(batch.skipped))
    heldout = FeedbackBatch()
    for item in batch.feedback:
        (heldout if is_heldout(item.completion_id, share) else train).feedback.append(item)
    for fid, completion_id in batch.superseded:
        (heldout if is_heldout(completion_id, share) else train).superseded.append((fid, completion_id))
    return Split(train=train, heldout=heldout)
