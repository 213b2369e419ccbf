"""Multichannel Wiener filtering and expectation-maximization of local Gaussian models (pure DSP).

In the style of open-unmix's ``openunmix/filtering.py`` and norbert (Liutkus & Stöter), written
here in torch on complex tensors (no nets, no trained parameters, norbert is not a dependency).

Model (Duong, Vincent & Gribonval 2010): each source j's STFT at (frame t, bin f) is a zero-mean
complex Gaussian vector over the audio channels with covariance ``v_j(t, f) R_j(f)``: a power
spectral density ``v_j`` [frames, bins] and a spatial covariance matrix ``R_j`` [bins, channels,
channels]. The mixture x is the sum of the sources, so the posterior mean of source j is::

    y_j(t, f) = v_j(t, f) R_j(f) C_x(t, f)^-1 x(t, f),   C_x = sum_k v_k R_k

Expectation-maximization alternates estimating (v_j, R_j) from the current y_j and recomputing
y_j. The filter is linear in x at each (t, f) and the gains sum to the identity, so the estimates
always sum to the mixture (up to the regularization ``eps``).

Every statistic is over the frames it is given: called on one segment's STFT, it depends on that
segment only (what engine.apply's streaming needs).
"""
from __future__ import annotations

import torch

__all__ = ["wiener", "softmask", "expectation_maximization", "get_local_gaussian_model",
           "get_mix_model", "apply_filter"]


def softmask(targets_spectrograms: torch.Tensor, mix_stft: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Ratio masks of nonnegative spectrograms applied to the mixture.

    targets_spectrograms: float [frames, bins, channels, sources]; mix_stft: complex [frames, bins,
    channels]. Returns complex [frames, bins, channels, sources]: x * v_j / (eps + sum_k v_k).
    """
    total = targets_spectrograms.sum(-1, keepdim=True) + eps
    return mix_stft[..., None] * (targets_spectrograms / total)


def get_local_gaussian_model(y_j: torch.Tensor, eps: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One source's local Gaussian model from its STFT estimate.

    y_j: complex [frames, bins, channels]. Returns (v_j float [frames, bins]: the power averaged
    over channels; R_j complex [bins, channels, channels]: sum_t y y^H / (eps + sum_t v_j)).
    """
    v_j = y_j.real.square() + y_j.imag.square()
    v_j = v_j.mean(-1)
    R_j = torch.einsum("tfc,tfd->fcd", y_j, y_j.conj())
    R_j = R_j / (eps + v_j.sum(0))[:, None, None]
    return v_j, R_j


def get_mix_model(v: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The mixture's covariance sum_j v_j R_j.

    v: float [frames, bins, sources]; R: complex [bins, channels, channels, sources].
    Returns complex [frames, bins, channels, channels].
    """
    return torch.einsum("tfj,fcdj->tfcd", v.to(R.dtype), R)


def _invert(M: torch.Tensor) -> torch.Tensor:
    """Inverse of M complex [..., channels, channels]: closed form for 1 and 2 channels."""
    n = M.shape[-1]
    if n == 1:
        return 1.0 / M
    if n == 2:
        a, b, c, d = M[..., 0, 0], M[..., 0, 1], M[..., 1, 0], M[..., 1, 1]
        inv_det = 1.0 / (a * d - b * c)
        return torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) * inv_det[..., None, None]
    return torch.linalg.inv(M)


def apply_filter(v: torch.Tensor, R: torch.Tensor, mix_stft: torch.Tensor, eps: float = 1e-10,
                 frames_per_batch: int = 256) -> torch.Tensor:
    """The multichannel Wiener filter of known models: y_j = v_j R_j (C_x + eps I)^-1 x.

    v: float [frames, bins, sources]; R: complex [bins, channels, channels, sources];
    mix_stft: complex [frames, bins, channels]. Returns complex [frames, bins, channels, sources].
    Runs over batches of frames to keep the [frames, bins, channels, channels] temporaries small.
    """
    frames, bins, channels = mix_stft.shape
    n_src = v.shape[-1]
    y = mix_stft.new_empty(frames, bins, channels, n_src)
    eye = torch.eye(channels, dtype=R.dtype, device=R.device)
    for t0 in range(0, frames, frames_per_batch):
        t = slice(t0, min(frames, t0 + frames_per_batch))
        Cxx = get_mix_model(v[t], R) + eps * eye  # [T, bins, channels, channels]
        x_hat = torch.einsum("tfcd,tfd->tfc", _invert(Cxx), mix_stft[t])  # C_x^-1 x
        # y_j = v_j R_j (C_x^-1 x)
        y[t] = torch.einsum("tfj,fcdj,tfd->tfcj", v[t].to(R.dtype), R, x_hat)
    return y


def expectation_maximization(y: torch.Tensor, x: torch.Tensor, iterations: int = 2,
                             eps: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Refine source estimates by EM of local Gaussian models (norbert / open-unmix).

    y: complex [frames, bins, channels, sources], initial estimates (e.g. ratio-masked mixture);
    x: complex [frames, bins, channels], the mixture. Returns (y complex [frames, bins, channels,
    sources], v float [frames, bins, sources], R complex [bins, channels, channels, sources]).
    Each iteration: (v_j, R_j) from y_j, then y_j = v_j R_j C_x^-1 x. ``iterations`` 0 returns y.
    """
    frames, bins, channels, n_src = y.shape
    assert x.shape == (frames, bins, channels), (x.shape, y.shape)
    v = y.real.new_zeros(frames, bins, n_src)
    R = y.new_zeros(bins, channels, channels, n_src)
    for _ in range(iterations):
        for j in range(n_src):
            v[..., j], R[..., j] = get_local_gaussian_model(y[..., j], eps)
        y = apply_filter(v, R, x, eps)
    return y, v, R


def wiener(targets_spectrograms: torch.Tensor, mix_stft: torch.Tensor, iterations: int = 1,
           softmask_init: bool = True, scale_factor: float = 10.0, eps: float = 1e-10) -> torch.Tensor:
    """Multichannel Wiener filter from nonnegative source spectrograms (norbert.wiener).

    targets_spectrograms: float [frames, bins, channels, sources] (magnitudes or powers: they set
    the initial ratio masks); mix_stft: complex [frames, bins, channels].
    softmask_init: start from ratio masks of the spectrograms applied to the mixture (norbert's
    ``use_softmask``); else from the spectrograms with the mixture's phase.
    The mixture is scaled so that its largest magnitude is at most ``scale_factor`` while iterating
    (the fixed ``eps`` regularization then means the same on loud and quiet input).
    Returns complex [frames, bins, channels, sources].
    """
    if softmask_init:
        y = softmask(targets_spectrograms, mix_stft, eps)
    else:
        y = targets_spectrograms * torch.exp(1j * torch.angle(mix_stft))[..., None]
    if not iterations:
        return y
    return refine(y, mix_stft, iterations, scale_factor, eps)


def refine(y: torch.Tensor, mix_stft: torch.Tensor, iterations: int, scale_factor: float = 10.0,
           eps: float = 1e-10) -> torch.Tensor:
    """EM refinement of initial estimates y complex [frames, bins, channels, sources] of the
    mixture mix_stft complex [frames, bins, channels], scaled as in ``wiener``. Same shape out."""
    max_abs = max(1.0, float(mix_stft.abs().max()) / scale_factor)
    y, _, _ = expectation_maximization(y / max_abs, mix_stft / max_abs, iterations, eps)
    return y * max_abs
