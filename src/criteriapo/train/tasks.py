"""Tasks turn a batch into ``(loss, metrics)`` for the one training loop.

A task knows how to collate its examples, how many loss units a batch holds (``counts``: tokens
for SFT, pairs for DPO), and how to compute the loss already divided by the totals of the whole
optimizer step, so accumulating micro-batches gives the same gradient as one big batch.
Metrics come back as (sum, count) pairs and are averaged over the step by the loop.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Protocol

import torch

from criteriapo.config import DPOConfig
from criteriapo.data.tokenize import TokenizedPair, TokenizedSFT, TokenizedUnpaired
from criteriapo.distributed import reshard
from criteriapo.losses.dpo import LogPs, LossParams, loss_spec, rewards
from criteriapo.losses.kto import KTOParams, kto_losses
from criteriapo.losses.logprobs import batch_logps
from criteriapo.models.lora import adapters_off, is_lora
from criteriapo.rows.packing import collate, sequence_segment
from criteriapo.rows.pairs import collate_pairs, collate_sequences
from criteriapo.train.scores import PairScores

Metrics = dict[str, tuple[float, float]]  # name -> (sum, count)


class Task(Protocol):
    name: str

    def collate(self, examples: Sequence[Any], indices: Sequence[int]) -> dict[str, torch.Tensor]: ...

    def length(self, example: Any) -> int: ...

    def group(self, example: Any) -> Hashable | None:
        """Examples with one key (not None) share work when in one batch: train.share_prompts puts them
        together."""
        ...

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]: ...

    # optional: ``step_sums(model, batch) -> dict[str, float]``, sums over a micro-batch computed
    # without gradient before the step's forward and backward, added up over the step (and every
    # process) into ``totals`` (KTO's KL estimate)
    # optional: ``evaluate(model, batch, totals) -> (loss, metrics, scores)``, the loss and metrics
    # of an evaluation batch and its examples' scores (DPO's PairScores), which the loop's
    # evaluation gathers in example order
    # optional: ``state() -> dict[str, Tensor]``, what the task holds that a checkpoint must keep
    # (its precomputed reference scores); the loop saves it under ``task.`` (``eval_task.``)

    def loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], totals: dict[str, int]
    ) -> tuple[torch.Tensor, Metrics]: ...


class SFTTask:
    """Next-token cross-entropy on completion tokens, averaged over every such token in the step."""

    name = "sft"

    def __init__(self, pad_id: int, packing: bool = True):
        self.pad_id, self.packing = pad_id, packing

    def collate(self, examples: Sequence[TokenizedSFT], indices: Sequence[int]) -> dict[str, torch.Tensor]:
        segments = [sequence_segment(e.input_ids, e.labels, i) for i, e in enumerate(examples)]
        batch = collate(segments, self.pad_id, self.packing)
        batch["count"] = torch.tensor(len(examples))
        return batch

    def length(self, example: TokenizedSFT) -> int:
        return len(example.input_ids)

    def group(self, example: TokenizedSFT) -> None:
        return None

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"tokens": batch["target"].numel()}

    def loss(self, model, batch, totals):
        out = batch_logps(model, batch, int(batch["count"]))
        loss = -out.logps.sum() / totals["tokens"]
        n = float(out.num_tokens.sum())
        return loss, {"logps/token": (float(out.logps.detach().sum()), n)}


def reference_scores(
    batch: dict[str, torch.Tensor], reference: PairScores | None, ref_model: torch.nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's log-probs of a two-sided batch (sequences 0..B-1 and B..2B-1): read from
    precomputed ``reference`` by example index, or scored by ``ref_model`` without gradient."""
    b = batch["index"].shape[0]
    device = batch["input_ids"].device
    if reference is not None:
        i = batch["index"].cpu()
        return reference.chosen.logps[i].to(device), reference.rejected.logps[i].to(device)
    out = scored_by_reference(ref_model, batch, 2 * b)
    return out.logps[:b], out.logps[b:]


def scored_by_reference(ref_model: torch.nn.Module, rows: dict[str, torch.Tensor], n: int):
    """``rows`` scored without gradient by a reference model: a LoRA policy with its adapters off
    (the policy itself, whose gathered weights its backward still needs), or a frozen model, whose
    weights FSDP2 leaves gathered after a forward without backward: they are released here."""
    with torch.no_grad(), adapters_off(ref_model):
        out = batch_logps(ref_model, rows, n)
    if not is_lora(ref_model):
        reshard(ref_model)
    return out


class DPOTask:
    """DPO and its variants against a reference: precomputed scores, a frozen model, or none."""

    name = "dpo"

    def __init__(
        self,
        cfg: DPOConfig,
        pad_id: int,
        vocab_size: int,
        reference: PairScores | None = None,
        ref_model: torch.nn.Module | None = None,
        packing: bool = True,
    ):
        self.cfg, self.pad_id, self.vocab, self.packing = cfg, pad_id, vocab_size, packing
        self.spec = loss_spec(cfg.loss_type)
        self.params = LossParams(cfg.beta, cfg.label_smoothing, cfg.simpo_gamma)
        self.reference_free = cfg.reference_free or self.spec.reference_free
        if not self.reference_free and reference is None and ref_model is None:
            raise ValueError("DPOTask needs reference scores or a reference model unless reference-free")
        self.reference, self.ref_model = reference, ref_model

    def collate(self, examples: Sequence[TokenizedPair], indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return collate_pairs(examples, indices, self.pad_id, self.packing)

    def length(self, example: TokenizedPair) -> int:
        return len(example.prompt_ids) + len(example.chosen_ids) + len(example.rejected_ids)

    def group(self, example: TokenizedPair) -> tuple[int, ...]:
        """A prompt's pairs: in one batch, the prompt and the replies they share are computed once."""
        return tuple(example.prompt_ids)

    def state(self) -> dict[str, torch.Tensor]:
        """The precomputed reference scores: saved with every checkpoint, so a resumed run scores
        nothing again."""
        return self.reference.state("reference") if self.reference is not None else {}

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        b = batch["index"].shape[0]
        return {"pairs": b, "chosen_tokens": int(batch["chosen_tokens"])}

    def _reference(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_free:
            zeros = torch.zeros(batch["index"].shape[0], device=batch["input_ids"].device)
            return zeros, zeros
        return reference_scores(batch, self.reference, self.ref_model)

    def loss(self, model, batch, totals):
        return self.evaluate(model, batch, totals)[:2]

    def evaluate(self, model, batch, totals) -> tuple[torch.Tensor, Metrics, PairScores]:
        """The loss and metrics of ``batch``, and the policy's scores of its pairs."""
        b = batch["index"].shape[0]
        out = batch_logps(model, batch, 2 * b)
        x = LogPs(out.logps[:b], out.logps[b:], *self._reference(batch))  # summed over completion tokens
        seen = x  # what the loss sees: per-token averages for ipo and simpo
        if self.spec.length_normalized:
            nc, nr = out.num_tokens[:b].clamp(min=1), out.num_tokens[b:].clamp(min=1)
            seen = LogPs(x.pc / nc, x.pr / nr, x.rc / nc, x.rr / nr)
        losses = self.spec.fn(seen, self.params)  # (B,)
        loss = (losses * batch["weight"]).sum() / totals["pairs"]
        nll_weight = self.spec.chosen_nll or self.cfg.rpo_alpha
        if nll_weight:
            # NLL of the chosen completions, averaged over every chosen token of the step
            loss = loss + nll_weight * -out.logps[:b].sum() / totals["chosen_tokens"]
        if self.spec.averaged_rewards:
            x = seen
        cr, rj = rewards(x, self.cfg.beta)  # implicit rewards
        ntok = out.num_tokens.float()
        n = float(b)
        metrics = {
            "rewards/chosen": (float(cr.sum()), n),
            "rewards/rejected": (float(rj.sum()), n),
            "rewards/accuracies": (float((cr > rj).float().sum()), n),
            "rewards/margins": (float((cr - rj).sum()), n),
            "logps/chosen": (float(x.pc.detach().sum()), n),
            "logps/rejected": (float(x.pr.detach().sum()), n),
            "logits/chosen": (float(out.logits_sum[:b].sum()), float(ntok[:b].sum()) * self.vocab),
            "logits/rejected": (float(out.logits_sum[b:].sum()), float(ntok[b:].sum()) * self.vocab),
        }
        if nll_weight:
            metrics["nll_loss"] = (float(-out.logps[:b].detach().sum()), float(ntok[:b].sum()))
        if self.spec.metrics is not None:
            for name, v in self.spec.metrics(seen, self.params).items():
                metrics[name] = (float(v.detach().sum()), n)
        return loss, metrics, PairScores.of_batch(out, b)


class KTOTask:
    """KTO (:mod:`criteriapo.losses.kto`) on unpaired examples. The KL reference point is estimated
    over the whole optimizer step (every micro-batch, every process: :meth:`step_sums`, without
    gradient, before the step's forward and backward), so accumulation and FSDP2 give the gradient of
    one big batch; TRL estimates it per device batch, which is the same when there is one. Reference
    scores come precomputed (``chosen``: the completion, ``rejected``: the KL completion, scored as a
    pair's two sides) or from a frozen model."""

    name = "kto"

    def __init__(
        self,
        cfg: DPOConfig,
        pad_id: int,
        vocab_size: int,
        reference: PairScores | None = None,
        ref_model: torch.nn.Module | None = None,
        packing: bool = True,
    ):
        if reference is None and ref_model is None:
            raise ValueError("KTOTask needs reference scores or a reference model")
        self.pad_id, self.vocab, self.packing = pad_id, vocab_size, packing
        self.params = KTOParams(cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
        self.reference, self.ref_model = reference, ref_model
        self.reference_free = False

    def collate(
        self, examples: Sequence[TokenizedUnpaired], indices: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """The completions (trained), and under ``kl_`` the KL completions (scored without gradient)."""
        # a prompt's completions (a pair split in two) in one segment where they fit in a pair's width
        width = max(len(e.prompt_ids) + len(e.completion_ids) + len(e.kl_ids) for e in examples)
        seqs = [(e.prompt_ids, e.completion_ids) for e in examples]
        main = collate_sequences(seqs, self.pad_id, self.packing, width)
        kl = collate_sequences([(e.prompt_ids, e.kl_ids) for e in examples], self.pad_id, self.packing)
        main.pop("labelled")
        batch = {**main, **{f"kl_{k}": v for k, v in kl.items() if k not in ("tokens", "labelled")}}
        batch["index"] = torch.tensor(list(indices), dtype=torch.long)
        batch["label"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
        return batch

    def length(self, example: TokenizedUnpaired) -> int:
        return len(example.prompt_ids) + len(example.completion_ids)

    def group(self, example: TokenizedUnpaired) -> tuple[int, ...]:
        """A prompt's examples (a pair split in two): in one batch, the prompt is computed once."""
        return tuple(example.prompt_ids)

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"examples": batch["index"].shape[0]}

    def state(self) -> dict[str, torch.Tensor]:
        """The precomputed reference scores (see :meth:`DPOTask.state`)."""
        return self.reference.state("reference") if self.reference is not None else {}

    def _reference(self, rows: dict[str, torch.Tensor], index: torch.Tensor, kl: bool) -> torch.Tensor:
        """The reference's log-probs of the completions (or, with ``kl``, the KL completions) of a
        batch's ``rows``: precomputed (the rejected side holds the KL completions), or scored."""
        if self.reference is not None:
            scores = self.reference.rejected if kl else self.reference.chosen
            return scores.logps[index.cpu()].to(rows["input_ids"].device)
        return scored_by_reference(self.ref_model, rows, index.shape[0]).logps

    @torch.no_grad()
    def step_sums(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """This micro-batch's share of the KL estimate: the sum of the KL completions' log-ratios
        (divided by the step's example count, one KL completion each, in :meth:`loss`)."""
        kl = {k.removeprefix("kl_"): v for k, v in batch.items() if k.startswith("kl_")}
        policy = batch_logps(model, kl, batch["index"].shape[0]).logps
        return {"kl_sum": float((policy - self._reference(kl, batch["index"], kl=True)).sum())}

    def loss(self, model, batch, totals):
        b = batch["index"].shape[0]
        out = batch_logps(model, batch, b)
        labels = batch["label"]
        logratios = out.logps - self._reference(batch, batch["index"], kl=False)
        z = torch.tensor(max(0.0, totals["kl_sum"] / totals["examples"]), device=out.logps.device)
        loss = kto_losses(logratios, labels, z, self.params).sum() / totals["examples"]
        rewards_ = (self.params.beta * logratios).detach()
        ntok = out.num_tokens.float()
        metrics: Metrics = {"kl": (float(z) * b, float(b))}
        for side, mask in (("chosen", labels), ("rejected", ~labels)):
            n = float(mask.sum())
            metrics[f"rewards/{side}"] = (float(rewards_[mask].sum()), n)
            metrics[f"logps/{side}"] = (float(out.logps.detach()[mask].sum()), n)
            logit_count = float(ntok[mask].sum()) * self.vocab
            metrics[f"logits/{side}"] = (float(out.logits_sum[mask].sum()), logit_count)
        return loss, metrics
