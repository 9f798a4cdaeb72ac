"""A compact GPT (nanoGPT-style) as a LightningModule, and random-token data, for the overhead benchmarks.

The model follows nanoGPT: learned position embeddings, pre-norm blocks with causal self-attention
(``scaled_dot_product_attention``) and a 4x MLP, the input embedding tied to the output head, AdamW. With the
``gpu`` preset (12 layers, width 768, 12 heads, vocabulary 50257, sequence 1024) it is GPT-2 small with an untied
output head, the model of the GPU overhead measurements: 163M parameters in 149 tensors, 652 MB of float32
gradients (``tie_weights=True`` gives GPT-2's own 124M in 148 tensors).

``grad_norm_recipe=True`` adds Lightning's documented recipe for per-parameter gradient norms
(``grad_norm`` + ``self.log_dict`` in ``on_before_optimizer_step``), the baseline GradGuard is compared with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    batch_size: int = 8
    precision: str = "bf16-mixed"
    tie_weights: bool = False


PRESETS = {
    # GPT-2 small, batch 8 x 1024 tokens: the configuration of the GPU overhead measurements
    "gpu": GPTConfig(),
    # small enough for a 2-core CPU (about 0.1-0.2 s per step), large enough that the step dominates Python
    # bookkeeping the way it does on real hardware; 4 layers: 52 parameter tensors
    "cpu": GPTConfig(vocab_size=2048, block_size=128, n_layer=4, n_head=4, n_embd=128, batch_size=8,
                     precision="32-true"),
    # for smoke tests of the scripts themselves
    "tiny": GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, batch_size=2,
                      precision="32-true"),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        q, k, v = (t.view(batch, seq, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, seq, width))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(LightningModule):
    """GPT language model trained on next-token prediction.

    Args:
        config: the model's size and batch.
        grad_norm_recipe: log per-parameter gradient norms with Lightning's documented recipe.
        lr: AdamW learning rate.

    """

    def __init__(self, config: GPTConfig, grad_norm_recipe: bool = False, lr: float = 3e-4) -> None:
        super().__init__()
        self.config = config
        self.grad_norm_recipe = grad_norm_recipe
        self.lr = lr
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight  # as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        idx, targets = batch
        logits = self(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.grad_norm_recipe:  # Lightning's documented recipe (lightning.pytorch.utilities.grad_norm)
            from lightning.pytorch.utilities import grad_norm

            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.95))


class RandomTokens(Dataset):
    """``length`` pairs (input, next tokens) of random token ids, deterministic per index."""

    def __init__(self, config: GPTConfig, length: int, seed: int = 0) -> None:
        self.config, self.length, self.seed = config, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        tokens = torch.randint(0, self.config.vocab_size, (self.config.block_size + 1,), generator=g)
        return tokens[:-1], tokens[1:]


def token_batches(config: GPTConfig, n_batches: int, seed: int = 0) -> DataLoader:
    return DataLoader(RandomTokens(config, n_batches * config.batch_size, seed), batch_size=config.batch_size)
