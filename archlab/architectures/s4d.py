"""S4D: diagonal structured state space (Gu et al. 2022, "On the Parameterization and
Initialization of Diagonal State Space Models").

Per channel h (H = d_model channels, each an independent SISO SSM with N/2 complex modes):
    x'(t) = A x(t) + B u(t),  y(t) = 2 Re(C x(t)) + D u(t),  A diagonal complex.
ZOH discretisation with a learned step dt_h:
    Abar = exp(dt A),  Bbar = (exp(dt A) - 1) / A * B.
Two computation modes of the same map, tested equal (tests/test_zoo2_ssm.py):
- convolution (training): K_l = 2 Re(sum_n C_n Bbar_n Abar_n^l), y = K * u (causal),
  by FFT (pad to 2T) or by direct causal conv1d (`kernel="fft" | "direct"`);
- recurrent (stepping): s_t = Abar s_{t-1} + Bbar u_t, y_t = 2 Re(C s_t) + D u_t.

Init (`init`): "lin" is S4D-Lin, A_n = -1/2 + i pi n, B = 1 (the paper's approximation of
HiPPO-LegS); "legs" is S4D-LegS, the eigenvalues of HiPPO-LegS's normal part with B
projected onto its eigenvectors. `d_state` is N, the real state size: N/2 complex modes
(the other half are the conjugates, accounted for by the 2 Re).

Block (the S4 repository's standard residual block): x + GLU(Linear(GELU(SSM(LN(x))))).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archlab.architectures.common import SteppedStack


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 6
    d_state: int = 64  # N, real state size (N/2 complex modes)
    dt_min: float = 0.001
    dt_max: float = 0.1
    init: str = "lin"  # "lin" (S4D-Lin) | "legs" (S4D-LegS)
    dropout: float = 0.0
    kernel: str = "auto"  # "auto" (= "fft") | "fft" | "direct"


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, d_state=16),
    "seed": Config(d_model=512, n_layers=6, d_state=64, dropout=0.1),
}

# exact count of build_model("s4d", "vector", FLAVORS[f], d_in=768); tests check it
PARAM_COUNTS = {"debug": 57568, "seed": 4542720}

KERNELS = ("fft", "direct")


def hippo_legs(N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HiPPO-LegS (A, P, B), float64, with A + P P^T normal (= -1/2 I + skew)."""
    n = torch.arange(N, dtype=torch.float64)
    r = torch.sqrt(2 * n + 1)
    A = -torch.tril(r[:, None] * r[None, :], diagonal=-1) - torch.diag(n + 1)
    P = torch.sqrt(n + 0.5)
    return A, P, r.clone()


def hippo_legs_nplr_half(N: int):
    """The normal-plus-low-rank form of HiPPO-LegS, A = V (Lambda - p p*) V*, restricted to
    the N/2 eigenvalues with positive imaginary part (their conjugates give the rest).

    Returns (Lambda [N/2] complex128, p [N/2], b [N/2]) with p = V* P and b = V* B.
    """
    if N % 2:
        raise ValueError(f"model.d_state must be even (N/2 complex modes), found {N}")
    A, P, B = hippo_legs(N)
    S = A + P[:, None] * P[None, :]  # normal part: -1/2 I + skew-symmetric
    skew = S + 0.5 * torch.eye(N, dtype=torch.float64)
    # a skew-symmetric matrix is i times a Hermitian one: eigh gives an orthonormal V
    w, V = torch.linalg.eigh(skew * -1j)  # skew = i * (-i skew); eigenvalues of skew are i w
    idx = torch.argsort(w, descending=True)[: N // 2]  # positive imaginary part first
    lam = -0.5 + 1j * w[idx]
    V = V[:, idx]  # (N, N/2)
    p = V.conj().T @ P.to(torch.complex128)
    b = V.conj().T @ B.to(torch.complex128)
    return lam, p, b


def causal_conv(u: torch.Tensor, K: torch.Tensor, kernel: str) -> torch.Tensor:
    """y_t = sum_{s<=t} K_{t-s} u_s per channel; u [B, H, T], K [H, T] -> [B, H, T]."""
    T = u.shape[-1]
    K = K.to(u.dtype)  # callers pass fp32 (fp64 in fp64 tests)
    if kernel == "fft":
        n = 2 * T  # zero-pad to 2T so the circular convolution is linear
        yf = torch.fft.rfft(u, n=n) * torch.fft.rfft(K, n=n)
        return torch.fft.irfft(yf, n=n)[..., :T]
    if kernel == "direct":
        # left pad T-1: output t sees inputs t-T+1..t; flip because conv1d correlates
        return F.conv1d(F.pad(u, (T - 1, 0)), K.flip(-1).unsqueeze(1), groups=K.shape[0])
    raise ValueError(f"model.kernel: expected one of auto, {', '.join(KERNELS)}; found {kernel!r}")


class ConvSSM(nn.Module):
    """Convolution mode of an SSM of H channels, y = K * u + D u, from the subclass's
    `conv_kernel(T)` -> K [H, T] and skip `D` [H] (S4D here, S4's DPLR kernel in s4.py)."""

    def forward(self, u: torch.Tensor, kernel: str) -> torch.Tensor:  # u [B, H, T]
        with torch.autocast(u.device.type, enabled=False):
            K = self.conv_kernel(u.shape[-1])
            uw = u.to(K.dtype)
            y = causal_conv(uw, K, kernel) + self.D[:, None] * uw
        return y.to(u.dtype)


class S4DKernel(ConvSSM):
    """The diagonal SSM of H channels: parameters, its convolution kernel and its step."""

    def __init__(self, H: int, N: int, dt_min: float, dt_max: float, init: str):
        super().__init__()
        if N % 2:
            raise ValueError(f"model.d_state must be even (N/2 complex modes), found {N}")
        half = N // 2
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        if init == "lin":
            A = -0.5 + 1j * math.pi * torch.arange(half, dtype=torch.float64)
            B = torch.ones(half, dtype=torch.complex128)
        elif init == "legs":
            A, _, B = hippo_legs_nplr_half(N)
        else:
            raise ValueError(f"model.init: expected 'lin' or 'legs', found {init!r}")
        A = A.to(torch.complex64).expand(H, half)
        B = B.to(torch.complex64).expand(H, half)
        # C ~ complex normal with unit variance (S4D)
        C = torch.randn(H, half, dtype=torch.complex64)
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.log(-A.real).clone())  # keeps Re A < 0
        self.A_imag = nn.Parameter(A.imag.clone())
        self.B = nn.Parameter(torch.view_as_real(B.clone()))  # (H, N/2, 2)
        self.C = nn.Parameter(torch.view_as_real(C))  # (H, N/2, 2)
        self.D = nn.Parameter(torch.randn(H))
        for p in (self.log_dt, self.log_A_real, self.A_imag):
            p._no_weight_decay = True

    def discrete(self):
        """(dtA [H, N/2], Bbar [H, N/2], C [H, N/2]) complex, in the parameters' precision
        (fp32 under autocast too: parameters stay fp32 and autocast is off here)."""
        dt = torch.exp(self.log_dt)
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)
        dtA = dt[:, None] * A
        Bbar = (torch.exp(dtA) - 1.0) / A * torch.view_as_complex(self.B)
        return dtA, Bbar, torch.view_as_complex(self.C)

    def conv_kernel(self, T: int) -> torch.Tensor:
        """K [H, T] real: K_l = 2 Re(sum_n C_n Bbar_n exp(dtA_n l))."""
        dtA, Bbar, C = self.discrete()
        l = torch.arange(T, device=dtA.device, dtype=self.log_dt.dtype)
        vander = torch.exp(dtA.unsqueeze(-1) * l)  # (H, N/2, T)
        return 2 * torch.einsum("hn,hnl->hl", C * Bbar, vander).real

    def step(self, u_t: torch.Tensor, s: torch.Tensor):  # u_t [B, H], s [B, H, N/2] complex
        with torch.autocast(u_t.device.type, enabled=False):
            dtA, Bbar, C = self.discrete()
            uw = u_t.to(self.D.dtype)
            s = torch.exp(dtA) * s + Bbar * uw.unsqueeze(-1)
            y = 2 * (s * C).sum(-1).real + self.D * uw
        return y.to(u_t.dtype), s


class SSMBlock(nn.Module):
    """x + GLU(Linear(GELU(SSM(LN(x))))) around an SSM of d_model channels: S4D here, the
    DPLR kernel in s4.py. The SSM has forward(u [B, H, T], kernel) and step(u_t, s)."""

    def __init__(self, cfg, ssm: nn.Module):
        super().__init__()
        H = cfg.d_model
        self.kernel = "fft" if cfg.kernel == "auto" else cfg.kernel
        if self.kernel not in KERNELS:
            raise ValueError(f"model.kernel: expected one of auto, {', '.join(KERNELS)}; found {cfg.kernel!r}")
        self.norm = nn.LayerNorm(H)
        self.ssm = ssm
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(H, 2 * H)  # GLU halves it back

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H]
        u = self.norm(x).transpose(1, 2)  # (B, H, T)
        y = self.ssm(u, self.kernel).transpose(1, 2)  # (B, T, H)
        return x + self.drop(F.glu(self.out(self.drop(F.gelu(y))), dim=-1))

    def init_state(self, batch: int, device=None) -> torch.Tensor:
        # complex state [B, H, N/2] in the SSM parameters' precision (complex128 for fp64 models)
        cdtype = torch.complex128 if self.ssm.D.dtype == torch.float64 else torch.complex64
        return torch.zeros(batch, *self.ssm.C.shape[:2], dtype=cdtype, device=device)

    def step(self, x_t: torch.Tensor, s: torch.Tensor):  # x_t [B, H]
        y, s = self.ssm.step(self.norm(x_t), s)
        return x_t + F.glu(self.out(F.gelu(y)), dim=-1), s


class SSMBackbone(SteppedStack):
    """`n_layers` SSMBlocks and a final LayerNorm; `make_ssm()` builds one layer's SSM."""

    def __init__(self, cfg, d_input: int, make_ssm):
        super().__init__(d_input, cfg.d_model, (SSMBlock(cfg, make_ssm()) for _ in range(cfg.n_layers)),
                         nn.LayerNorm(cfg.d_model))
        self.d_state = cfg.d_state
        self.kernel_path = "fft" if cfg.kernel == "auto" else cfg.kernel


def build(config: Config, d_input: int) -> nn.Module:
    return SSMBackbone(config, d_input, lambda: S4DKernel(config.d_model, config.d_state, config.dt_min,
                                                          config.dt_max, config.init))
