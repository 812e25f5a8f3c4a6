"""S4 with the diagonal-plus-low-rank (DPLR) kernel (Gu, Goel, Re 2022, "Efficiently
Modeling Long Sequences with Structured State Spaces"), in plain PyTorch, small N.

Per channel h (H = d_model channels), a SISO SSM on M = N/2 complex modes:
    A = diag(Lambda) - P P*   (Q = P, the stable "S4 with tied P" form),
    y = 2 Re(C s) + D u,
initialised from HiPPO-LegS's normal-plus-low-rank form (restricted to the N/2 eigenvalues
with positive imaginary part, as in S4D, see s4d.hippo_legs_nplr_half). Bilinear
discretisation: Abar = (I - dt/2 A)^-1 (I + dt/2 A), Bbar = dt (I - dt/2 A)^-1 B.

Convolution mode (training) computes the length-L kernel K_l = 2 Re(C Abar^l Bbar) from its
generating function at the L roots of unity z_k = exp(-2 pi i k / L):
    Khat(z) = C~ (I - Abar z)^-1 Bbar = dt C~ [(1 - z) I - dt/2 (1 + z) A]^-1 B,
    C~ = C (I - Abar^L)        (z^L = 1 truncates the geometric series at L),
where the inverse of diag((1 - z) - u Lambda) + u P P* (u = dt/2 (1 + z)) is applied with the
Woodbury identity (rank 1), so only Cauchy-like sums over the modes are needed; then
K = 2 Re(ifft(Khat)). This form has no pole at z = -1 (the (2/(1+z)) form of the paper
does), so even L needs no special case. C~ needs Abar^L, computed densely
(torch.linalg.matrix_power on M x M): that is the "small N" part; the paper learns C~
directly instead. Recurrent mode (stepping) uses the dense Abar, Bbar.
Both modes compute the same map and are tested equal (tests/test_zoo2_ssm.py), and the
kernel is tested against the direct powers C Abar^l Bbar.

Block: the S4 repository's standard residual block, x + GLU(Linear(GELU(SSM(LN(x))))).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from archlab.architectures.s4d import ConvSSM, SSMBackbone, hippo_legs_nplr_half


@dataclass
class Config:
    d_model: int = 256
    n_layers: int = 4
    d_state: int = 64  # N, real state size (N/2 complex modes); dense M^3 cost: keep small
    dt_min: float = 0.001
    dt_max: float = 0.1
    dropout: float = 0.0
    kernel: str = "auto"  # "auto" (= "fft") | "fft" | "direct": how K is applied to u


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, d_state=16),
    "seed": Config(d_model=512, n_layers=6, d_state=64, dropout=0.1),
}

# exact count of build_model("s4", "vector", FLAVORS[f], d_in=768); tests check it
PARAM_COUNTS = {"debug": 58592, "seed": 4739328}


class DPLRKernel(ConvSSM):
    """H channels of a DPLR SSM: parameters, the Cauchy/Woodbury kernel and the dense step."""

    def __init__(self, H: int, N: int, dt_min: float, dt_max: float):
        super().__init__()
        lam, p, b = hippo_legs_nplr_half(N)
        M = N // 2
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        self.log_lam_real = nn.Parameter(torch.log(-lam.real).float().expand(H, M).clone())
        self.lam_imag = nn.Parameter(lam.imag.float().expand(H, M).clone())
        self.P = nn.Parameter(torch.view_as_real(p.to(torch.complex64).expand(H, M).clone()))
        self.B = nn.Parameter(torch.view_as_real(b.to(torch.complex64).expand(H, M).clone()))
        # C ~ complex normal, variance 1/2 per part (S4's init)
        self.C = nn.Parameter(torch.view_as_real(torch.randn(H, M, dtype=torch.complex64)))
        self.D = nn.Parameter(torch.randn(H))
        for q in (self.log_dt, self.log_lam_real, self.lam_imag, self.P):
            q._no_weight_decay = True

    def params(self):
        """(dt [H], Lambda, P, B, C [H, M]) in the parameters' precision (fp32 normally,
        also under autocast: parameters stay fp32 and autocast is off here)."""
        dt = torch.exp(self.log_dt)
        lam = torch.complex(-torch.exp(self.log_lam_real), self.lam_imag)
        c = torch.view_as_complex
        return dt, lam, c(self.P), c(self.B), c(self.C)

    def dense(self):
        """Bilinear (Abar [H, M, M], Bbar [H, M]) from A = diag(Lambda) - P P*."""
        dt, lam, P, B, _ = self.params()
        M = lam.shape[-1]
        eye = torch.eye(M, dtype=lam.dtype, device=lam.device)
        A = torch.diag_embed(lam) - P.unsqueeze(-1) * P.conj().unsqueeze(-2)  # (H, M, M)
        half = (dt / 2).to(lam.dtype)[:, None, None]
        minus = eye - half * A
        Abar = torch.linalg.solve(minus, eye + half * A)
        Bbar = dt.to(lam.dtype)[:, None] * torch.linalg.solve(minus, B.unsqueeze(-1)).squeeze(-1)
        return Abar, Bbar

    def conv_kernel(self, L: int) -> torch.Tensor:
        """K [H, L] real, K_l = 2 Re(C Abar^l Bbar), via the generating function at the L
        roots of unity (Cauchy sums + rank-1 Woodbury), see the module docstring."""
        dt, lam, P, B, C = self.params()
        Abar, _ = self.dense()
        eye = torch.eye(lam.shape[-1], dtype=lam.dtype, device=lam.device)
        Ct = (C.unsqueeze(-2) @ (eye - torch.linalg.matrix_power(Abar, L))).squeeze(-2)  # (H, M)
        k = torch.arange(L, device=lam.device, dtype=dt.dtype)
        z = torch.exp(torch.complex(torch.zeros_like(k), -2 * math.pi * k / L))  # (L,)
        u = (dt[:, None] / 2) * (1 + z)  # (H, L)
        Dz = (1 - z)[None, :, None] - u.unsqueeze(-1) * lam.unsqueeze(1)  # (H, L, M), never 0
        inv = 1.0 / Dz

        def cauchy(a, b):  # sum_n a_n b_n / Dz_n -> (H, L)
            return torch.einsum("hm,hlm->hl", a * b, inv)

        k00, k01 = cauchy(Ct, B), cauchy(Ct, P)
        k10, k11 = cauchy(P.conj(), B), cauchy(P.conj(), P)
        khat = dt[:, None] * (k00 - u * k01 * k10 / (1 + u * k11))  # (H, L)
        return 2 * torch.fft.ifft(khat, dim=-1).real

    def step(self, x_t: torch.Tensor, s: torch.Tensor):  # x_t [B, H], s [B, H, M] complex
        with torch.autocast(x_t.device.type, enabled=False):
            Abar, Bbar = self.dense()
            _, _, _, _, C = self.params()
            xw = x_t.to(self.D.dtype)
            s = torch.einsum("hmn,bhn->bhm", Abar, s) + Bbar * xw.unsqueeze(-1)
            y = 2 * (s * C).sum(-1).real + self.D * xw
        return y.to(x_t.dtype), s


def build(config: Config, d_input: int) -> nn.Module:
    # the same residual stack as S4D (s4d.SSMBlock): only the SSM differs
    return SSMBackbone(config, d_input, lambda: DPLRKernel(config.d_model, config.d_state, config.dt_min,
                                                           config.dt_max))
