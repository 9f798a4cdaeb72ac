"""The RNN article's examples in plain PyTorch, each loop with one added line: ``guard = watch(model, optimizer)``.

The article "Why is .grad returning None when updating weighted matrices in a PyTorch RNN?" (January 2025) uses
hand-written loops, so this is where its readers live. Each example below is the article's code with the one
GradGuard line added:

1. ``h0 = torch.zeros(...).detach()``: the article says this blocks gradient flow. GradGuard: every parameter
   received a gradient (a fresh tensor of zeros has no history to cut).
2. ``self.weight = nn.Parameter(...)`` used through ``torch.matmul``: the article calls it unregistered.
   GradGuard: registered, and it received a gradient.
3. ``optimizer.zero_grad()`` inside the loop: the article's code crashes (``nn.RNN`` returns a tuple); corrected,
   zeroing once per step is the normal pattern and every parameter receives a gradient at every step.

Then the bugs that really do leave an RNN without gradients, planted in one model, trained with gradient
accumulation (4 micro-batches per optimizer step) in an ordinary hand-written loop:

4. an unused layer: an ``attention`` projection that ``forward`` never calls;
5. a detached path: the encoder's output goes through ``.detach()`` before the decoder.

GradGuard names the parameters, counts the steps and micro-batches without a gradient, says why (cause) and where
(the source line), and writes a TensorBoard run with its dashboard to ``runs/plain_pytorch``::

    python examples/plain_pytorch.py
    tensorboard --logdir runs/plain_pytorch     # Custom Scalars, Text and Images tabs
    gradguard report runs/plain_pytorch         # the report again, from the log directory
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
import torch.nn as nn

from lightning_gradguard import watch

SEQ, BATCH, INPUT, HIDDEN, OUTPUT = 20, 32, 10, 20, 5


def banner(title: str) -> None:
    print(f"\n=== {title} ===")


# ------------------------------------------------------------------------------------------------ example 1
class MyRNN1(nn.Module):
    def __init__(self, input_size, hidden_size, output_size):
        super().__init__()
        self.rnn = nn.RNN(input_size, hidden_size)
        self.fc = nn.Linear(hidden_size, output_size)

    def forward(self, x):
        # "INCORRECT: Detaching the hidden state prevents gradient flow", says the article
        h0 = torch.zeros(1, x.size(1), self.rnn.hidden_size).detach()
        output, hn = self.rnn(x, h0)
        output = self.fc(output[-1, :, :])  # Only use the last output
        return output


def example_1(steps: int = 5) -> None:
    banner("Article example 1: h0 = torch.zeros(...).detach()")
    model = MyRNN1(input_size=INPUT, hidden_size=HIDDEN, output_size=OUTPUT)
    x = torch.randn(SEQ, BATCH, INPUT)
    y = torch.randn(BATCH, OUTPUT)
    criterion = nn.MSELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    guard = watch(model, optimizer)  # <- the one added line
    for _ in range(steps):
        optimizer.zero_grad()
        output = model(x)
        loss = criterion(output, y)
        loss.backward()
        optimizer.step()
    guard.close()  # optional in a script: an open guard reports when the interpreter exits


# ------------------------------------------------------------------------------------------------ example 2
class MyRNN2(nn.Module):
    def __init__(self, input_size, hidden_size, output_size):
        super().__init__()
        self.rnn = nn.RNN(input_size, hidden_size)
        self.fc = nn.Linear(hidden_size, output_size)
        # "INCORRECT: weight not registered as a parameter", says the article (it is registered)
        self.weight = nn.Parameter(torch.randn(hidden_size, hidden_size))

    def forward(self, x):
        h0 = torch.zeros(1, x.size(1), self.rnn.hidden_size)
        output, hn = self.rnn(x, h0)
        output = self.fc(torch.matmul(output, self.weight))  # Using custom weight
        return output


def example_2(steps: int = 5) -> None:
    banner("Article example 2: self.weight = nn.Parameter(...) through torch.matmul")
    model = MyRNN2(input_size=INPUT, hidden_size=HIDDEN, output_size=OUTPUT)
    x = torch.randn(SEQ, BATCH, INPUT)
    y = torch.randn(BATCH, OUTPUT)
    criterion = nn.MSELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    guard = watch(model, optimizer)  # <- the one added line
    for _ in range(steps):
        optimizer.zero_grad()
        output = model(x)
        with warnings.catch_warnings():  # the article's (20, 32, 5) output broadcasts against a (32, 5) target
            warnings.filterwarnings("ignore", message="Using a target size")
            loss = criterion(output, y)
        loss.backward()
        optimizer.step()
    guard.close()


# ------------------------------------------------------------------------------------------------ example 3
def example_3(steps: int = 10) -> None:
    banner("Article example 3: optimizer.zero_grad() inside the loop (corrected so that it runs)")
    model = nn.RNN(10, 20)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    criterion = nn.MSELoss()
    x = torch.randn(20, 32, 10)  # Sequence Length, Batch Size, Input Size
    y = torch.randn(20, 32, 20)  # Target shape
    guard = watch(model, optimizer)  # <- the one added line
    for _ in range(steps):
        optimizer.zero_grad()  # "INCORRECTLY placed inside the loop", says the article: it is the normal place
        output, _ = model(x)  # the article passes the (output, h_n) tuple to the loss, which raises
        loss = criterion(output, y)
        loss.backward()
        optimizer.step()
    guard.close()


# ------------------------------------------------------------------------------------------------ the real bugs
class Seq2SeqRNN(nn.Module):
    """An encoder-decoder RNN with two planted bugs (marked BUG)."""

    def __init__(self, input_size: int = INPUT, hidden_size: int = HIDDEN, output_size: int = OUTPUT) -> None:
        super().__init__()
        self.encoder = nn.GRU(input_size, hidden_size)
        self.decoder = nn.GRU(hidden_size, hidden_size)
        self.attention = nn.Linear(hidden_size, hidden_size)  # BUG: defined, never called in forward
        self.head = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.encoder(x)
        states = states.detach()  # BUG: cuts every encoder weight off the loss
        decoded, _ = self.decoder(states)
        return self.head(decoded[-1])


def real_bugs(steps: int = 6, accumulate: int = 4, log_dir: str = "runs/plain_pytorch") -> None:
    banner(f"Real bugs: an unused layer and a detached encoder, accumulate={accumulate} micro-batches per step")
    torch.manual_seed(0)
    model = Seq2SeqRNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    criterion = nn.MSELoss()
    flow = 2 if importlib.util.find_spec("matplotlib") else None  # the gradient-flow image needs matplotlib
    guard = watch(  # <- the one added line (spread out here to show the dashboard options)
        model, optimizer, log_dir=log_dir, log_every_n_steps=1, histogram_every_n_steps=2,
        gradient_flow_every_n_steps=flow,
    )  # fmt: skip
    for i in range(steps * accumulate):
        x, y = torch.randn(SEQ, 8, INPUT), torch.randn(8, OUTPUT)
        loss = criterion(model(x), y) / accumulate
        loss.backward()
        if (i + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
    report = guard.close()
    print("\nWhat each flagged parameter's report says (report.params[name].cause / .detail):")
    for name in report.missing:
        p = report.params[name]
        print(f"- {name}: no gradient at {p.none_steps}/{p.steps} steps, {p.none_micro_batches}/{p.micro_batches} "
              f"micro-batches; cause={p.cause}")  # fmt: skip
    print(f"\nTensorBoard run: {log_dir} (report also in {guard.report_path})")


def main() -> None:
    warnings.simplefilter("ignore", UserWarning)  # GradGuard's per-step warnings: the summaries say it all here
    torch.manual_seed(0)
    example_1()
    example_2()
    example_3()
    real_bugs()


if __name__ == "__main__":
    main()
