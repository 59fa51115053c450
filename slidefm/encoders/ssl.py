"""DINOv2-style self-distillation of a timm ViT tile encoder (Oquab et al. 2023).

Student and EMA teacher share the architecture; the teacher starts as an exact copy of the
loaded model (random init or a registry entry's weights: domain adaptation) and follows the
student by an exponential moving average whose momentum rises by a cosine from
``momentum_teacher`` to 1. The loss is, as in DINOv2:

* DINO: cross-entropy between the teacher's prototype distribution of each global crop and the
  student's of every other crop (global and local); teacher outputs centred by Sinkhorn–Knopp
  (or by an EMA centre, as in DINO), sharpened with a warmed-up temperature.
* iBOT: the student sees global crops with block-masked patch tokens (a learned mask token) and
  predicts the teacher's prototype distribution of the unmasked patch at every masked position.
* KoLeo: −mean log distance of each student CLS embedding to its nearest neighbour in the
  batch, which spreads embeddings (the Kozachenko–Leonenko entropy estimator).

``lightly`` (MIT) has these losses, but it requires pytorch_lightning and hydra-core; the three
losses are ~60 lines here, checked against their formulas in tests/test_ssl.py.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from slidefm.encoders.tile import pool_tokens


@dataclasses.dataclass(frozen=True)
class SSLConfig:
    out_dim: int = 4096  # prototypes (DINOv2: 65536; small models need far fewer)
    hidden_dim: int = 1024
    bottleneck_dim: int = 128
    head_layers: int = 3
    head_bn: bool = False  # BatchNorm after each hidden layer of the head (DINO's use_bn)
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup_steps: int = 100
    centering: str = "sinkhorn"  # sinkhorn (DINOv2) | center (DINO's EMA centre)
    center_momentum: float = 0.9
    sinkhorn_iters: int = 3
    momentum_teacher: float = 0.992  # → 1.0 by a cosine over training
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    mask_prob: float = 0.5  # fraction of global crops that get masked patches
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # masked share of patches, drawn per crop

    def __post_init__(self) -> None:
        if self.centering not in ("sinkhorn", "center"):
            raise ValueError(f"centering must be sinkhorn or center, not {self.centering!r}")


# -- the ViT forward with masking and any input size -----------------------------------------
def vit_tokens(
    trunk: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None, mask_token=None
) -> torch.Tensor:
    """timm ``VisionTransformer.forward_features`` for (B, 3, H, W) inputs of any size divisible
    by the patch size (position embedding resampled, as timm's ``dynamic_img_size``), with the
    patch tokens where ``mask`` (B, N) bool is True replaced by ``mask_token`` (1, 1, C) before
    position embedding (iBOT). Returns final-norm tokens (B, T, C), prefix tokens first."""
    from timm.layers import resample_abs_pos_embed

    pe = trunk.patch_embed
    t = pe.proj(x)
    h, w = t.shape[-2:]
    t = pe.norm(t.flatten(2).transpose(1, 2))
    if mask is not None:
        t = torch.where(mask.unsqueeze(-1), mask_token.to(t.dtype).expand_as(t), t)
    prefix = []
    if trunk.cls_token is not None:
        prefix.append(trunk.cls_token.expand(t.shape[0], -1, -1))
    if getattr(trunk, "reg_token", None) is not None:
        prefix.append(trunk.reg_token.expand(t.shape[0], -1, -1))
    pos = trunk.pos_embed
    if pos is not None:
        n_pos_prefix = 0 if trunk.no_embed_class else trunk.num_prefix_tokens
        if (h, w) != tuple(pe.grid_size):
            pos = resample_abs_pos_embed(
                pos, new_size=(h, w), old_size=pe.grid_size, num_prefix_tokens=n_pos_prefix
            )
        if trunk.no_embed_class:
            t = torch.cat([*prefix, t + pos], dim=1)
        else:
            t = torch.cat([*prefix, t], dim=1) + pos
    else:
        t = torch.cat([*prefix, t], dim=1)
    t = trunk.norm_pre(trunk.patch_drop(trunk.pos_drop(t)))
    return trunk.norm(trunk.blocks(t))


class DINOHead(nn.Module):
    """MLP → L2-normalised bottleneck → weight-normalised prototypes (norm fixed to 1).

    ``bn``: BatchNorm after each hidden linear layer (DINO's ``use_bn``). A randomly initialised
    ViT gives nearly the same CLS direction for every image, so without it the teacher's
    logits differ across images by less than the teacher temperature and its targets start
    (and stay) uniform; batch statistics centre the head's input and restore that spread."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        layers: int,
        bn: bool = False,
    ):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mods: list[nn.Module] = []
        for i in range(len(dims) - 1):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                if bn:
                    mods.append(nn.BatchNorm1d(dims[i + 1]))
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        g = self.last_layer.parametrizations.weight.original0
        g.data.fill_(1.0)
        g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


# -- losses -----------------------------------------------------------------------------------
def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    """(B, K) teacher logits → (B, K) targets whose rows sum to 1 and whose prototype (column)
    marginals are equal, by ``iters`` Sinkhorn–Knopp normalisations of exp(logits / temp)
    (SwAV / DINOv2; sums all-reduced across DDP ranks)."""
    q = torch.exp((logits.float() - logits.float().max()) / temp).t()  # (K, B)
    b = torch.tensor(float(q.shape[1]), device=q.device)
    b = _all_reduce(b)
    k = q.shape[0]
    q /= _all_reduce(q.sum())
    for _ in range(iters):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, student_temp: float) -> torch.Tensor:
    """student (S, B, K) logits of S crops, teacher (T, B, K) target probabilities of the first
    T (global) crops: mean over pairs (s, t), s ≠ t, of −Σ_k p_t log softmax(z_s / τ)_k, each
    pair averaged over the batch."""
    logp = F.log_softmax(student.float() / student_temp, dim=-1)
    total, n = student.new_zeros((), dtype=torch.float32), 0
    for t in range(teacher.shape[0]):
        for s in range(student.shape[0]):
            if s == t:
                continue
            total = total - (teacher[t] * logp[s]).sum(-1).mean()
            n += 1
    return total / max(1, n)


def ibot_loss(
    student: torch.Tensor, teacher: torch.Tensor, owner: torch.Tensor, n_images: int, temp: float
) -> torch.Tensor:
    """Masked-patch loss: student (M, K) logits and teacher (M, K) targets of the M masked
    tokens, ``owner`` (M,) the image of each. Token losses −Σ p log softmax(z / τ) are averaged
    within each image, then over the images that have masked tokens."""
    if student.shape[0] == 0:
        return student.sum() * 0.0
    tok = -(teacher * F.log_softmax(student.float() / temp, dim=-1)).sum(-1)
    per_img = torch.zeros(n_images, device=tok.device).index_add_(0, owner, tok)
    count = torch.zeros(n_images, device=tok.device).index_add_(0, owner, torch.ones_like(tok))
    has = count > 0
    return (per_img[has] / count[has]).mean()


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """−mean_i log ‖x̂_i − x̂_{nn(i)}‖ for L2-normalised rows x̂ of (B, D), nn(i) the nearest
    other row (Sablayrolles et al. 2019, as in DINOv2)."""
    z = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sim = z @ z.t()
        sim.fill_diagonal_(-2.0)
        nn_idx = sim.argmax(dim=1)
    d = (z - z[nn_idx]).norm(dim=-1)
    return -torch.log(d + eps).mean()


@torch.no_grad()
def target_entropies(p: torch.Tensor) -> tuple[float, float]:
    """(B, K) target distributions → (mean entropy of a row, entropy of the batch-mean row), in
    nats. Healthy DINO targets are sharp per image (low first) but spread over prototypes across
    the batch (high second); both ≈ ln K is collapse to uniform, both ≈ 0 collapse to one
    prototype (Caron et al. 2021, Fig. 7)."""
    p = p.float().clamp_min(1e-12)
    row = float(-(p * p.log()).sum(-1).mean())
    m = p.mean(0)
    return row, float(-(m * m.log()).sum())


def block_masks(n: int, h: int, w: int, ratio: tuple[float, float], prob: float) -> torch.Tensor:
    """(n, h·w) bool masks: a ``prob`` share of the n crops get random rectangles (aspect
    ratio log-uniform in [0.3, 3.3]) until ≈ U(ratio) of their patches are masked (torch RNG)."""
    out = torch.zeros(n, h, w, dtype=torch.bool)
    n_masked = int(round(prob * n))
    for i in torch.randperm(n)[:n_masked].tolist():
        target = int(round(float(torch.empty(()).uniform_(*ratio)) * h * w))
        for _ in range(50):
            if int(out[i].sum()) >= target:
                break
            area = float(torch.empty(()).uniform_(1.0, max(1.0, target - int(out[i].sum()))))
            ar = math.exp(float(torch.empty(()).uniform_(math.log(0.3), math.log(3.3))))
            bh = max(1, min(h, int(round(math.sqrt(area * ar)))))
            bw = max(1, min(w, int(round(math.sqrt(area / ar)))))
            top = int(torch.randint(0, h - bh + 1, ()))
            left = int(torch.randint(0, w - bw + 1, ()))
            out[i, top : top + bh, left : left + bw] = True
    return out.view(n, h * w)


# -- the model --------------------------------------------------------------------------------
class DINOModel(nn.Module):
    """Student (trunk + head, trained) and teacher (EMA copy, no gradients).

    ``forward(batch)`` with ``batch["global"]`` (B, G, 3, S, S) and optionally ``batch["local"]``
    (B, L, 3, s, s) returns (loss, metrics) for ``slidefm.train.loop.Trainer``; the trainer calls
    ``on_optimizer_step`` after each step, which updates the teacher.
    """

    def __init__(self, trunk: nn.Module, cfg: SSLConfig, pooling: str = "cls"):
        super().__init__()
        self.cfg, self.pooling = cfg, pooling
        dim = trunk.embed_dim
        self.student = trunk
        self.student_head = DINOHead(
            dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers, cfg.head_bn
        )
        self.teacher = copy.deepcopy(trunk).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.student_head).requires_grad_(False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.register_buffer("patch_center", torch.zeros(1, cfg.out_dim))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ schedules
    def teacher_temp(self) -> float:
        c, s = self.cfg, int(self.steps_done)
        if s >= c.teacher_temp_warmup_steps:
            return c.teacher_temp
        f = s / max(1, c.teacher_temp_warmup_steps)
        return c.warmup_teacher_temp + f * (c.teacher_temp - c.warmup_teacher_temp)

    def momentum(self, step: int, max_steps: int) -> float:
        m0 = self.cfg.momentum_teacher
        return 1.0 - (1.0 - m0) * (math.cos(math.pi * step / max(1, max_steps)) + 1.0) / 2.0

    @torch.no_grad()
    def on_optimizer_step(self, step: int, max_steps: int) -> None:
        """EMA teacher ← m·teacher + (1 − m)·student, m from the cosine schedule."""
        m = self.momentum(step, max_steps)
        for s_mod, t_mod in ((self.student, self.teacher), (self.student_head, self.teacher_head)):
            t_params = dict(t_mod.named_parameters())
            for name, p in s_mod.named_parameters():
                t_params[name].mul_(m).add_(p.detach(), alpha=1.0 - m)
        self.steps_done += 1
        self._last_momentum = m

    # ------------------------------------------------------------------ targets
    @torch.no_grad()
    def _targets(self, logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
        if self.cfg.centering == "sinkhorn":
            return sinkhorn_knopp(logits, temp, self.cfg.sinkhorn_iters)
        probs = F.softmax((logits.float() - center) / temp, dim=-1)
        if self.training:
            n = torch.tensor(float(logits.shape[0]), device=logits.device)
            mean = _all_reduce(logits.float().sum(0, keepdim=True)) / _all_reduce(n)
            center.mul_(self.cfg.center_momentum).add_(mean, alpha=1 - self.cfg.center_momentum)
        return probs

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        g = batch["global"]
        b, n_g = g.shape[:2]
        g = g.transpose(0, 1).flatten(0, 1)  # (G·B, 3, S, S), crop-major
        npre = self.student.num_prefix_tokens
        gh, gw = (s // p for s, p in zip(g.shape[-2:], self.student.patch_embed.patch_size))
        masks = block_masks(n_g * b, gh, gw, cfg.mask_ratio, cfg.mask_prob).to(g.device)
        if int(masks.sum()) < 2:  # a head with BatchNorm needs ≥ 2 rows: no iBOT this step
            masks.zero_()
        temp = self.teacher_temp()
        with torch.no_grad():
            t_tok = vit_tokens(self.teacher, g)
            t_cls = self.teacher_head(t_tok[:, 0])
            t_cls_p = self._targets(t_cls, self.center, temp).view(n_g, b, -1)
            if masks.any():
                t_patch = self.teacher_head(t_tok[:, npre:][masks])
                t_patch_p = self._targets(t_patch, self.patch_center, temp)
        s_tok = vit_tokens(self.student, g, masks, self.mask_token)
        s_cls_emb = s_tok[:, 0]
        cls = [s_cls_emb]
        if "local" in batch and batch["local"].numel():
            loc = batch["local"].transpose(0, 1).flatten(0, 1)
            cls.append(vit_tokens(self.student, loc)[:, 0])
        # one head call over every crop (as DINO's multi-crop wrapper: shared BatchNorm stats)
        s_logits = self.student_head(torch.cat(cls)).view(-1, b, cfg.out_dim)
        l_dino = dino_loss(s_logits, t_cls_p, cfg.student_temp)
        if masks.any():
            owner = torch.arange(n_g * b, device=g.device).unsqueeze(1).expand_as(masks)[masks]
            s_patch = self.student_head(s_tok[:, npre:][masks])
            l_ibot = ibot_loss(s_patch, t_patch_p, owner, n_g * b, cfg.student_temp)
        else:
            l_ibot = s_logits.sum() * 0.0
        l_koleo = sum(koleo_loss(c) for c in s_cls_emb.view(n_g, b, -1)) / n_g
        loss = cfg.dino_weight * l_dino + cfg.ibot_weight * l_ibot + cfg.koleo_weight * l_koleo
        h_row, h_mean = target_entropies(t_cls_p.flatten(0, 1))
        return loss, {
            "dino_loss": float(l_dino.detach()),
            "teacher_entropy": h_row,  # ln K: uniform collapse; 0: one-hot targets
            "teacher_batch_entropy": h_mean,  # 0: every image → one prototype (collapse)
            "ibot_loss": float(l_ibot.detach()),
            "koleo_loss": float(l_koleo.detach()),
            "teacher_temp": temp,
            "masked_share": float(masks.float().mean()),
        }

    @torch.no_grad()
    def teacher_embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised tiles → (B, D) teacher tile embeddings (the spec's pooling),
        the encoder this run exports."""
        return pool_tokens(
            vit_tokens(self.teacher, x), self.pooling, self.teacher.num_prefix_tokens
        )
