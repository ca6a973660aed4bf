"""fp32 linear-layer products on this CPU: torch's BLAS against oneDNN, side by side.

The shapes are the linear layers of the peer-baseline model (hidden 256, intermediate 688)
and of a Qwen2.5-0.5B-shaped one (hidden 896, intermediate 4864), at the rows of a batch:
``x @ W.T`` (forward) and ``g @ W`` (the input's gradient). It prints GFLOP/s for each and
the ratio; ``modelloop.models.cpu_linear`` is what the training stage uses.

Usage: .venv/bin/python bench/cpu_matmul.py
"""

from __future__ import annotations

import time

import torch

SHAPES = {
    "peer baseline (256/688)": [(256, 256), (128, 256), (256, 688), (688, 256)],
    "qwen2.5-0.5b (896/4864)": [(896, 896), (128, 896), (896, 4864), (4864, 896)],
}
ROWS = (360, 1024, 4096)


def seconds(function, repeat: int = 50) -> float:
    for _ in range(5):
        function()
    started = time.perf_counter()
    for _ in range(repeat):
        function()
    return (time.perf_counter() - started) / repeat


def times(kind: str, rows: int, out_features: int, in_features: int) -> tuple[float, float]:
    """Seconds of one product by torch's BLAS and by oneDNN."""
    onednn = torch.ops.mkldnn._linear_pointwise
    weight = torch.randn(out_features, in_features)
    if kind == "forward":
        x = torch.randn(rows, in_features)
        return seconds(lambda: x @ weight.t()), seconds(lambda: onednn(x, weight, None, "none", [], ""))
    grad = torch.randn(rows, out_features)
    return seconds(lambda: grad @ weight), seconds(lambda: onednn(grad, weight.t(), None, "none", [], ""))


def main() -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, BLAS: {'MKL' if torch.backends.mkl.is_available() else 'other'}, ISA: {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"{'model':26} {'rows':>5} {'product':>8} {'BLAS GFLOP/s':>13} {'oneDNN GFLOP/s':>15} {'ratio':>6}")
    for model, shapes in SHAPES.items():
        for rows in ROWS:
            for kind in ("forward", "grad in"):
                measured = [times(kind, rows, out_features, in_features) for out_features, in_features in shapes]
                blas, onednn = (sum(pair[i] for pair in measured) for i in (0, 1))
                flops = sum(2 * rows * out_features * in_features for out_features, in_features in shapes)
                print(
                    f"{model:26} {rows:5} {kind:>8} {flops / blas / 1e9:13.0f} {flops / onednn / 1e9:15.0f} {blas / onednn:5.2f}x"
                )


if __name__ == "__main__":
    main()
