"""One rank of a two-process DDP run of the Hugging Face Trainer with GradGuardCallback (see ``test_hf.py``).

Started once per rank with the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...);
writes what this rank's guard reported to ``<out>/rank<k>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
from torch import nn

os.environ["HF_HUB_OFFLINE"] = "1"
warnings.filterwarnings("ignore")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from lightning_gradguard.hf import GradGuardCallback  # noqa: E402


class RankDependent(GPT2LMHeadModel):
    """``value_head`` is never called; ``rank_head`` joins the loss on rank 0 only."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__(config)
        self.value_head = nn.Linear(config.n_embd, 1)
        self.rank_head = nn.Linear(config.n_embd, 1)

    def forward(self, **inputs):
        out = super().forward(**inputs)
        if os.environ["RANK"] == "0":
            out["loss"] = out["loss"] + 0.01 * self.rank_head(out["logits"][..., : self.config.n_embd]).mean()
        return out


def main(out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                        eos_token_id=0)
    model = RankDependent(config)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(16):
        ids = torch.randint(0, 64, (12,), generator=g)
        data.append({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"), per_device_train_batch_size=2, max_steps=3, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, remove_unused_columns=False,
        ddp_backend="gloo", ddp_find_unused_parameters=True,
    )
    guard = GradGuardCallback(summary=False)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[guard])
    trainer.train()
    result = {
        "report": guard.report().to_dict(),
        "report_path": guard.report_path,
        "logged_steps": [e["step"] for e in trainer.state.log_history if "gradguard/total_norm" in e],
    }
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
