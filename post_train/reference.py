"""Reference-model log-probs, computed once per (model, tokenised data) and cached on disk.

The reference model is frozen, so its log-probs on a dataset never change: f-divergence SFT
(reference = base model) and DPO (reference = SFT model) read them from the cache instead of
running a second model at every step. The cache key hashes the model's weights and the exact
token ids, so a change of model, tokenizer, chat template or `max_length` misses the cache.

Under `accelerate launch` every process computes a share of the batches, the shares are
gathered, and rank 0 alone writes the cache file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from post_train.fingerprint import model_fingerprint
from post_train.modeling import pad_collate, target_logprobs, to_device


def examples_fingerprint(examples: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(str(example["input_ids"]).encode())
        digest.update(str(example["loss_mask"]).encode())
    return digest.hexdigest()


@torch.no_grad()
def _compute(
    model: torch.nn.Module,
    examples: list[dict[str, Any]],
    collate: Callable,
    batch_size: int,
    device,
    rank: int = 0,
    processes: int = 1,
) -> dict[int, list[list[float]]]:
    """Rows of every `processes`-th batch from `rank` on, keyed by the batch's first example."""
    rows: dict[int, list[list[float]]] = {}
    starts = range(0, len(examples), batch_size)[rank::processes]
    for start in tqdm(starts, desc="reference log-probs", disable=rank != 0):
        chunk = examples[start : start + batch_size]
        batch = to_device(collate(chunk), device)
        logps, _ = target_logprobs(model, batch)
        rows[start] = [
            row[: len(example["input_ids"]) - 1].tolist() for row, example in zip(logps.float().cpu(), chunk)
        ]
    return rows


def reference_logps(
    load_reference: Callable[[], torch.nn.Module],
    model_path: str,
    examples: list[dict[str, Any]],
    collate: Callable,
    batch_size: int,
    cache_dir: Path,
    device,
    accelerator=None,
) -> tuple[list[list[float]], bool]:
    """Per-token log-probs of each example's next tokens under the reference, and whether they were cached.

    `load_reference` is only called on a cache miss, so a hit never loads the model. With an
    `accelerator` of several processes, all of them must call this together.
    """
    key = hashlib.sha256(f"{model_fingerprint(model_path)}:{examples_fingerprint(examples)}".encode()).hexdigest()[:24]
    file = cache_dir / "reference-logps" / f"{key}.pt"
    processes = accelerator.num_processes if accelerator is not None else 1
    hit = file.is_file()
    if processes > 1:  # one decision for all: a process that skipped the work would leave the others waiting
        hit = bool(accelerator.reduce(torch.tensor(int(hit), device=accelerator.device), "min").item())
    if hit:
        stored = torch.load(file, weights_only=True)
        return [row.tolist() for row in torch.split(stored["values"], stored["lengths"].tolist())], True
    rank = accelerator.process_index if accelerator is not None else 0
    shares = _compute(load_reference().to(device), examples, collate, batch_size, device, rank, processes)
    if processes > 1:
        from accelerate.utils import gather_object

        shares = {start: rows for share in gather_object([shares]) for start, rows in share.items()}
    rows = [row for start in sorted(shares) for row in shares[start]]
    if rank == 0:
        file.parent.mkdir(parents=True, exist_ok=True)
        # One scratch file per process: two stages may compute the same entry at once.
        partial = file.with_suffix(f".{os.getpid()}.partial")
        torch.save(
            {"values": torch.tensor([v for row in rows for v in row]), "lengths": torch.tensor([len(r) for r in rows])},
            partial,
        )
        os.replace(partial, file)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return rows, False


def add_demonstration_references(
    load_reference: Callable[[], torch.nn.Module],
    model_path: str,
    rows: list[dict[str, Any]],
    pad_token_id: int,
    micro_batch_size: int,
    cache_dir: Path,
    accelerator,
) -> bool:
    """Each demonstration row gets its per-token reference log-probs as `ref_logps` (`reference_logps`);
    whether they came from the cache."""
    values, hit = reference_logps(
        load_reference,
        model_path,
        rows,
        pad_collate(pad_token_id),
        micro_batch_size,
        cache_dir,
        accelerator.device,
        accelerator,
    )
    for row, value in zip(rows, values):
        row["ref_logps"] = value
    return hit


def add_pair_references(
    load_reference: Callable[[], torch.nn.Module],
    model_path: str,
    pairs: list[dict[str, Any]],
    pad_token_id: int,
    micro_batch_size: int,
    cache_dir: Path,
    accelerator,
) -> bool:
    """Each pair gets the summed reference log-probs of its responses' counted tokens as `ref_chosen` and
    `ref_rejected` (both sides in one pass, `2 × micro_batch_size` sequences at a time); whether they came from
    the cache."""
    sequences = [pair["chosen"] for pair in pairs] + [pair["rejected"] for pair in pairs]
    values, hit = reference_logps(
        load_reference,
        model_path,
        sequences,
        pad_collate(pad_token_id),
        2 * micro_batch_size,
        cache_dir,
        accelerator.device,
        accelerator,
    )
    for pair, chosen, rejected in zip(pairs, values[: len(pairs)], values[len(pairs) :]):
        for side, row in (("chosen", chosen), ("rejected", rejected)):
            counted = pair[side]["loss_mask"][1:]
            pair[f"ref_{side}"] = sum(value for value, keep in zip(row, counted) if keep)
    return hit
