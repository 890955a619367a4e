"""An independent check of transformers' KDA kernels against a literal fp64 recurrence.

The reference below is written from the paper's definition (arXiv 2510.26692), per head:

    S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T      S: (dk, dv)
    o_t = S_t^T q_t / sqrt(dk)

with q, k unit vectors. It is compared with the library's chunked and recurrent PyTorch paths
(the ones that run without flash-linear-attention). Measured relative errors are logged.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers.models.kimi_linear import modeling_kimi_linear as kimi_lib

log = logging.getLogger(__name__)

B, H, DK, DV = 2, 2, 16, 16
FP32_TOL = 1e-4  # fp32 noise over ~200 steps; the measured errors are about 1e-6


def reference_kda(q, k, v, log_alpha, beta, state=None):
    """Literal KDA recurrence in fp64. q, k: (B, T, H, dk) unit rows, v: (B, T, H, dv),
    log_alpha: (B, T, H, dk), beta: (B, T, H). Returns o (B, T, H, dv) and S (B, H, dk, dv)."""
    q, k, v, log_alpha, beta = (x.double() for x in (q, k, v, log_alpha, beta))
    batch, length, heads, dk = k.shape
    S = torch.zeros(batch, heads, dk, v.shape[-1], dtype=torch.float64)
    if state is not None:
        S = state.double().clone()
    eye = torch.eye(dk, dtype=torch.float64)
    out = []
    for t in range(length):
        k_t, v_t, b_t = k[:, t], v[:, t], beta[:, t, :, None, None]  # (B, H, dk), (B, H, dv)
        decayed = log_alpha[:, t].exp()[..., None] * S  # Diag(alpha_t) S_{t-1}
        erase = eye - b_t * k_t[..., :, None] * k_t[..., None, :]  # I - beta k k^T
        S = erase @ decayed + b_t * k_t[..., :, None] * v_t[..., None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) / dk**0.5)
    return torch.stack(out, dim=1), S


def random_inputs(length: int, decay: str, seed: int = 0):
    """Random unit q, k, values, per-channel log decays and betas, in fp32."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, length, H, DK, generator=gen), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, length, H, DK, generator=gen), dim=-1)
    v = torch.randn(B, length, H, DV, generator=gen)
    rates = {"weak": 1e-3, "mixed": 0.5, "strong": 30.0}[decay]
    log_alpha = -rates * torch.rand(B, length, H, DK, generator=gen)  # alpha in (0, 1]
    beta = torch.rand(B, length, H, generator=gen)
    return q, k, v, log_alpha, beta


def chunked(q, k, v, log_alpha, beta, state=None, chunk_size=64):
    return kimi_lib.chunk_kimi_delta_attention(
        q, k, v, g=log_alpha, beta=beta, chunk_size=chunk_size, initial_state=state,
        output_final_state=True, use_qk_l2norm_in_kernel=False)


def recurrent(q, k, v, log_alpha, beta, state=None):
    return kimi_lib.recurrent_kimi_delta_attention(
        q, k, v, g=log_alpha, beta=beta, initial_state=state, output_final_state=True,
        use_qk_l2norm_in_kernel=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("decay", ["weak", "mixed", "strong"])
@pytest.mark.parametrize("length", [1, 64, 100, 130])
def test_library_matches_fp64_reference(length, decay):
    inputs = random_inputs(length, decay)
    o_ref, s_ref = reference_kda(*inputs)
    for name, (o, s) in (("chunk", chunked(*inputs)), ("recurrent", recurrent(*inputs))):
        assert torch.isfinite(o).all() and torch.isfinite(s).all()
        err_o, err_s = rel_err(o, o_ref), rel_err(s, s_ref)
        log.info("KDA %s T=%d %s decay: rel err output %.2e, state %.2e",
                 name, length, decay, err_o, err_s)
        assert err_o < FP32_TOL and err_s < FP32_TOL


def test_reductions_of_the_reference():
    """alpha = 1 and beta = 0 leave the state unchanged; beta = 0 is pure decay."""
    q, k, v, log_alpha, beta = random_inputs(5, "mixed")
    start = torch.randn(B, H, DK, DV, dtype=torch.float64)
    _, kept = reference_kda(q, k, v, torch.zeros_like(log_alpha), torch.zeros_like(beta), start)
    assert torch.allclose(kept, start)
    _, decayed = reference_kda(q, k, v, log_alpha, torch.zeros_like(beta), start)
    total = log_alpha.double().sum(1).exp()[..., None]  # (B, H, dk, 1)
    assert torch.allclose(decayed, total * start)


@pytest.mark.parametrize("split", [37, 64, 90])
def test_state_carried_across_a_split(split):
    inputs = random_inputs(130, "mixed", seed=1)
    o_full, s_full = chunked(*inputs)
    first = [x[:, :split] for x in inputs]
    second = [x[:, split:] for x in inputs]
    o_a, s_a = chunked(*first)
    o_b, s_b = chunked(*second, state=s_a)
    o_r, s_r = recurrent(*second, state=s_a)
    err = rel_err(torch.cat([o_a, o_b], dim=1), o_full)
    log.info("KDA split at %d: rel err output %.2e, state %.2e", split, err, rel_err(s_b, s_full))
    assert err < FP32_TOL and rel_err(s_b, s_full) < FP32_TOL
    assert rel_err(o_r, o_b) < FP32_TOL and rel_err(s_r, s_b) < FP32_TOL


@pytest.mark.parametrize("chunk_size", [16, 32])
def test_chunk_size_changes_nothing(chunk_size):
    inputs = random_inputs(100, "mixed", seed=2)
    o64, s64 = chunked(*inputs)
    o, s = chunked(*inputs, chunk_size=chunk_size)
    assert rel_err(o, o64) < FP32_TOL and rel_err(s, s64) < FP32_TOL


@pytest.mark.parametrize("decay", ["mixed", "strong"])
def test_gradients_chunked_vs_recurrent(decay):
    inputs = random_inputs(70, decay, seed=3)
    weight = torch.randn(B, 70, H, DV, generator=torch.Generator().manual_seed(4))
    grads = []
    for run in (chunked, recurrent):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        out, state = run(*leaves)
        ((out * weight).sum() + state.square().sum()).backward()
        grads.append([leaf.grad for leaf in leaves])
    for name, g_chunk, g_rec in zip(("q", "k", "v", "log_alpha", "beta"), *grads, strict=True):
        assert torch.isfinite(g_chunk).all() and torch.isfinite(g_rec).all()
        err = rel_err(g_chunk, g_rec)
        log.info("KDA grad %s (%s decay): chunk vs recurrent rel err %.2e", name, decay, err)
        assert err < 1e-3


def test_gate_is_in_unit_interval_and_finite():
    """The library's forget gate gives log alpha <= 0 (alpha in (0, 1]), finite for big inputs."""
    from transformers import KimiLinearConfig

    config = KimiLinearConfig(hidden_size=32, linear_num_heads=2, linear_head_dim=16)
    gate = kimi_lib.KimiLinearForgetGate(config)
    torch.nn.init.uniform_(gate.dt_bias, -1, 1)
    torch.nn.init.uniform_(gate.A_log, 0, 3)
    log_alpha = gate(1e3 * torch.randn(1, 9, 32))  # (1, 9, heads, dk)
    assert log_alpha.shape == (1, 9, 2, 16)
    assert torch.isfinite(log_alpha).all() and (log_alpha <= 0).all()
