"""A miniature hierarchical vision transformer (Swin-like) with per-task decoders, for the MTLoRA
experiment of python/train_mtlora.py (docs/mtlora_experiment.md).

Layout, scaled down from Swin-T (patch 4, C = 96, depths 2-2-6-2, window 7, 224 px):
  12x12 canvas zero-padded to 16x16 -> patch embedding (2x2 patches, C channels) -> 3 stages of
  window-attention blocks at 8x8, 4x4 and 2x2 tokens with C, 2C, 4C channels, patch merging
  between them. Window 4 (stage 1: 4 windows, every second block shifted by 2 as in Swin; stage 2:
  one window; stage 3: 2x2, one window), relative position bias, MLP ratio 4.

Every linear is called as ``y, y_tasks = lin(x, x_tasks)`` (``call_linear``), the protocol of
MTLoRA's layers, so ``to_mtlora`` can swap ``nn.Linear`` for ``palora_kernels.MTLoRALinear`` in
place. As in the reference's Swin, task-specific adapters go on proj, fc1 and fc2 of the LAST
block of each stage; that block then also returns one feature map per task (its residual
stream recomputed with the task outputs), and the decoders read those. Difference from the
reference: the decoders read each stage's output BEFORE patch merging (8x8, 4x4, 2x2 tokens),
not after, so the segmentation head has 2x2-pixel tokens to work from.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PAD = 2                     # 12x12 canvas + 2 px each side = 16x16, divisible by patch 2 and two mergings
TARGETS = ("qkv", "proj", "fc1", "fc2", "reduction")       # the reference's QKV/PROJ/FC1/FC2/DOWNSAMPLER_ENABLED
TASK_SPECIFIC = ("proj", "fc1", "fc2")                      # in the last block of each stage (reference)


def call_linear(lin: nn.Module, x: torch.Tensor, x_tasks=None):
    """(y, {task: y_t} or None): a plain nn.Linear has no task outputs; MTLoRA layers return both."""
    if type(lin) is nn.Linear:
        return lin(x), None
    return lin(x, x_tasks)


def _windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, C)


def _unwindows(x: torch.Tensor, w: int, B: int, H: int, W: int) -> torch.Tensor:
    C = x.shape[-1]
    x = x.view(B, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        c = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1],
                             persistent=False)

    def forward(self, x, mask=None):
        """x: (B_, N, C) windows -> (y, {task: y_t} or None), each (B_, N, C)."""
        B_, N, C = x.shape
        qkv, _ = call_linear(self.qkv, x)
        q, k, v = qkv.view(B_, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + bias.permute(2, 0, 1)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.heads, N, N) + mask[None, :, None]
            attn = attn.view(B_, self.heads, N, N)
        y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, C)
        return call_linear(self.proj, y)


class Block(nn.Module):
    def __init__(self, dim: int, res: int, heads: int, window: int, shift: int, mlp_ratio: int = 4):
        super().__init__()
        self.res, self.window, self.shift = res, window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)
        mask = None
        if shift:   # Swin's shifted-window mask: tokens from different regions of the rolled map do not attend
            img = torch.zeros(1, res, res, 1)
            cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
            for i, (h, w) in enumerate((h, w) for h in cuts for w in cuts):
                img[:, h, w] = i
            ids = _windows(img, window).squeeze(-1)
            mask = (ids[:, None, :] != ids[:, :, None]).float() * -100.0
        self.register_buffer("attn_mask", mask, persistent=False)

    def _attend(self, x):
        B, L, C = x.shape
        h = self.norm1(x).view(B, self.res, self.res, C)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), (1, 2))
        y, y_tasks = self.attn(_windows(h, self.window), self.attn_mask)

        def back(t):
            t = _unwindows(t, self.window, B, self.res, self.res)
            if self.shift:
                t = torch.roll(t, (self.shift, self.shift), (1, 2))
            return x + t.reshape(B, L, C)
        return back(y), None if y_tasks is None else {t: back(v) for t, v in y_tasks.items()}

    def forward(self, x):
        """x: (B, L, C) -> (x, {task: x_t} or None)."""
        a, a_tasks = self._attend(x)
        h, h_tasks = call_linear(self.fc1, self.norm2(a),
                                 None if a_tasks is None else {t: self.norm2(v) for t, v in a_tasks.items()})
        h = F.gelu(h)
        h_tasks = None if h_tasks is None else {t: F.gelu(v) for t, v in h_tasks.items()}
        m, m_tasks = call_linear(self.fc2, h, h_tasks)
        if m_tasks is None:
            return a + m, None
        base = a_tasks if a_tasks is not None else {t: a for t in m_tasks}
        return a + m, {t: base[t] + m_tasks[t] for t in m_tasks}


class PatchMerging(nn.Module):
    def __init__(self, dim: int, res: int):
        super().__init__()
        self.res = res
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        B, L, C = x.shape
        x = x.view(B, self.res, self.res, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return call_linear(self.reduction, self.norm(x.view(B, -1, 4 * C)))[0]


class Stage(nn.Module):
    def __init__(self, dim, res, depth, heads, window, merge: bool):
        super().__init__()
        window = min(window, res)                    # Swin: a map no larger than the window is one window,
        self.blocks = nn.ModuleList(Block(dim, res, heads, window,   # and then nothing to shift
                                          window // 2 if (i % 2 and res > window) else 0)
                                    for i in range(depth))
        self.downsample = PatchMerging(dim, res) if merge else None

    def forward(self, x):
        """-> (features for the decoders, {task: features} or None, input of the next stage)."""
        x_tasks = None
        for blk in self.blocks:
            x, x_tasks = blk(x)
        return x, x_tasks, (self.downsample(x) if self.downsample is not None else x)


class MiniSwin(nn.Module):
    """x: (B, 1, 12, 12) -> list over stages of (shared (B, L_i, C_i), {task: (B, L_i, C_i)} or None)."""

    def __init__(self, dim: int = 24, depths=(2, 2, 2), heads=(2, 4, 8), window: int = 4, side: int = 12):
        super().__init__()
        self.side, res = side, (side + 2 * PAD) // 2
        self.patch_embed = nn.Conv2d(1, dim, 2, 2)
        self.norm_embed = nn.LayerNorm(dim)
        self.dims, self.res = [], []
        self.stages = nn.ModuleList()
        for i, (d, h) in enumerate(zip(depths, heads)):
            self.dims.append(dim * 2 ** i)
            self.res.append(res // 2 ** i)
            self.stages.append(Stage(self.dims[-1], self.res[-1], d, h, window, merge=i < len(depths) - 1))
        for m in self.modules():                                       # Swin's init
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(F.pad(x, (PAD,) * 4))
        x = self.norm_embed(x.flatten(2).transpose(1, 2))
        out = []
        for stage in self.stages:
            f, f_tasks, x = stage(x)
            out.append((f, f_tasks))
        return out


class SegHead(nn.Module):
    """HRNet-style head, tiny: each stage 1x1-projected to ``ch``, upsampled to stage 1 and summed,
    a 3x3 conv, then ``classes`` x 2x2 logits per stage-1 token (pixel shuffle; tokens are 2x2 px)."""

    def __init__(self, dims, res, classes: int, ch: int = 32):
        super().__init__()
        self.res = res
        self.proj = nn.ModuleList(nn.Linear(d, ch) for d in dims)
        self.fuse = nn.Conv2d(ch, ch, 3, padding=1)
        self.cls = nn.Conv2d(ch, classes * 4, 1)

    def forward(self, feats):
        r0 = self.res[0]
        acc = 0
        for f, p, r in zip(feats, self.proj, self.res):
            m = p(f).transpose(1, 2).reshape(f.shape[0], -1, r, r)
            acc = acc + (m if r == r0 else F.interpolate(m, size=(r0, r0), mode="bilinear", align_corners=False))
        y = F.pixel_shuffle(self.cls(F.gelu(self.fuse(F.gelu(acc)))), 2)      # (B, K, 16, 16)
        return y[:, :, PAD:-PAD, PAD:-PAD]


class ClsHead(nn.Module):
    """Digit class from the last stage's 2x2 tokens, flattened (keeps where each token is: the left
    and right digits sit in different corners, which mean pooling would lose)."""

    def __init__(self, dim: int, tokens: int, classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim * tokens)
        self.fc = nn.Linear(dim * tokens, classes)

    def forward(self, feats):
        f = feats[-1]
        return self.fc(self.norm(f.flatten(1)))


class PretrainNet(nn.Module):
    """Backbone + mean-pooled linear classifier: the single-task pre-training (one digit per canvas)."""

    def __init__(self, backbone: MiniSwin, classes: int = 10):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.dims[-1], classes)

    def forward(self, x):
        return [self.head(self.backbone(x)[-1][0].mean(1))]


class MultiTaskNet(nn.Module):
    """Backbone + one decoder per task. forward(x) -> {task: logits}; each decoder reads its task's
    features where the backbone has task-specific blocks, the shared features otherwise."""

    def __init__(self, backbone: MiniSwin, tasks: dict):
        super().__init__()
        self.backbone, self.tasks = backbone, tasks
        heads = {}
        for t, (kind, classes) in tasks.items():
            if kind == "seg":
                heads[t] = SegHead(backbone.dims, backbone.res, classes)
            else:
                heads[t] = ClsHead(backbone.dims[-1], backbone.res[-1] ** 2, classes)
        self.decoders = nn.ModuleDict(heads)

    def forward(self, x):
        stages = self.backbone(x)
        return {t: self.decoders[t]([f if ft is None else ft[t] for f, ft in stages]) for t in self.tasks}


def to_mtlora(backbone: MiniSwin, tasks, r_shared: int, r_task: int, scale: float = 4.0, dropout: float = 0.0,
              shared_mode: str = "matrix") -> MiniSwin:
    """Swap every target linear of ``backbone`` for ``palora_kernels.MTLoRALinear`` in place, copying the
    pretrained weights; proj/fc1/fc2 of each stage's last block get task adapters (``tasks``), the
    rest only the shared one (``tasks=None``: plain LoRA of rank ``r_shared``). Then freeze as the
    reference's ``mark_only_lora_as_trainable`` with its defaults: adapters, patch embedding, layer
    norms and relative position biases train; every pretrained linear (reduction included) is frozen."""
    from palora_kernels import MTLoRALinear
    for si, stage in enumerate(backbone.stages):
        last = len(stage.blocks) - 1
        for parent_name, parent in stage.named_modules():
            for name, lin in list(parent.named_children()):
                if name not in TARGETS or type(lin) is not nn.Linear:
                    continue
                in_last = parent_name in (f"blocks.{last}", f"blocks.{last}.attn")
                specific = tasks is not None and name in TASK_SPECIFIC and in_last
                t = list(tasks) if specific else None
                new = MTLoRALinear(lin.in_features, lin.out_features,
                                   r={"shared": r_shared, **{k: r_task for k in t}} if t else r_shared,
                                   lora_shared_scale=scale, lora_task_scale={k: scale for k in t} if t else scale,
                                   lora_dropout=dropout, tasks=t, trainable_scale_shared=False,
                                   trainable_scale_per_task=False, shared_mode=shared_mode if t else "matrix",
                                   bias=lin.bias is not None)
                with torch.no_grad():
                    new.linear.weight.copy_(lin.weight)
                    if lin.bias is not None:
                        new.linear.bias.copy_(lin.bias)
                setattr(parent, name, new)
    for n, p in backbone.named_parameters():
        p.requires_grad_("lora_" in n or "patch_embed" in n or "norm" in n or "relative_position_bias_table" in n)
    return backbone


def freeze(backbone: nn.Module) -> nn.Module:
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
