"""Blending subject embeddings: two subjects by t, four by (u, v), as in the paper's figure 2.

Conventions
- Factors must be finite and in [0, 1]; anything else is refused (ValueError naming the
  input), never clamped, so a typo cannot silently pick an endpoint.
- t = 0 returns the first input and t = 1 the second, bit for bit, in both modes.
- "spherical" works per query vector (over the last dim, each of the 16 vectors on its
  own): the direction is slerped and the length interpolated linearly, so two vectors of
  equal length keep that length all the way. Where slerp is undefined (a zero vector,
  or directions (anti)parallel within ~1e-4 rad) that vector falls back to linear.
- Bilinear corners: a = (u=0, v=0), b = (1, 0), c = (0, 1), d = (1, 1); u moves a->b and
  c->d, then v moves between those two rows.
- The maths runs in float64 and is cast back to the inputs' dtype.
"""
from __future__ import annotations

import math

import torch

from .subject import Subject

INTERPOLATIONS = ("linear", "spherical")
_PARALLEL_SIN = 1e-4   # below this sin(angle) slerp's 1/sin(angle) amplifies rounding: use lerp
_ZERO_NORM = 1e-12


def check_factor(name: str, value) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not math.isfinite(f) or not 0.0 <= f <= 1.0:
        raise ValueError(f"{name} must be a finite number in [0, 1], got {value!r}")
    return f


def check_same_shape(**tensors: torch.Tensor) -> None:
    (first, ref), *rest = tensors.items()
    for name, t in rest:
        if t.shape != ref.shape:
            raise ValueError(f"cannot blend {name} of shape {tuple(t.shape)} with {first} of shape "
                             f"{tuple(ref.shape)}: the subjects come from encoders of different width or "
                             "token count; encode them with the same model")


def _endpoint(a, b, t):
    """Exact endpoints: the blend formulas are only approximately a or b at 0 and 1."""
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    return None


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    t = check_factor("t", t)
    check_same_shape(a=a, b=b)
    end = _endpoint(a, b, t)
    if end is not None:
        return end
    return ((1.0 - t) * a.double() + t * b.double()).to(a.dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    t = check_factor("t", t)
    check_same_shape(a=a, b=b)
    end = _endpoint(a, b, t)
    if end is not None:
        return end
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(dim=-1, keepdim=True), b64.norm(dim=-1, keepdim=True)
    ua, ub = a64 / na.clamp_min(_ZERO_NORM), b64 / nb.clamp_min(_ZERO_NORM)
    # atan2 of |cross| and dot keeps the angle accurate near 0 and pi, where acos(dot) is not.
    dot = (ua * ub).sum(-1, keepdim=True)
    sin = (ub - dot * ua).norm(dim=-1, keepdim=True)
    omega = torch.atan2(sin, dot)
    sin_omega = torch.sin(omega)
    safe = sin_omega.clamp_min(_PARALLEL_SIN)
    direction = (torch.sin((1.0 - t) * omega) * ua + torch.sin(t * omega) * ub) / safe
    spherical = direction * ((1.0 - t) * na + t * nb)
    linear = (1.0 - t) * a64 + t * b64
    fallback = (sin_omega < _PARALLEL_SIN) | (na < _ZERO_NORM) | (nb < _ZERO_NORM)
    return torch.where(fallback, linear, spherical).to(a.dtype)


def blend(a, b, t, mode="linear"):
    if mode not in INTERPOLATIONS:
        raise ValueError(f"mode must be one of {INTERPOLATIONS}, got {mode!r}")
    return (lerp if mode == "linear" else slerp)(a, b, t)


def bilinear(a, b, c, d, u: float, v: float, mode="linear") -> torch.Tensor:
    """Corners a (0,0), b (1,0), c (0,1), d (1,1); see the module docstring."""
    u, v = check_factor("u", u), check_factor("v", v)
    check_same_shape(a=a, b=b, c=c, d=d)
    return blend(blend(a, b, u, mode), blend(c, d, u, mode), v, mode)


def pick_category(choice: str, categories: dict[str, str], custom: str = "") -> str:
    """choice is a source's key ('a', 'b', ...) or 'custom' (then custom must be non-empty)."""
    if choice == "custom":
        if not (custom or "").strip():
            raise ValueError("category is 'custom' but custom_category is empty: type the category word")
        return custom.strip()
    if choice not in categories:
        raise ValueError(f"category must be one of {sorted(categories) + ['custom']}, got {choice!r}")
    return categories[choice]


def _shared_meta(subjects: dict[str, Subject]) -> dict:
    """Encoder identity carried over only when every source agrees (LoadSubject checks it)."""
    out = {}
    for key in ("encoder", "encoder_fingerprint"):
        values = {s.meta.get(key) for s in subjects.values()}
        if len(values) == 1 and None not in values:
            out[key] = values.pop()
    return out


def interpolate_subjects(subjects: dict[str, Subject], factors: dict[str, float], mode: str,
                         category: str, custom_category: str = "") -> Subject:
    """Two subjects {'a','b'} with {'t'}, or four {'a','b','c','d'} with {'u','v'}."""
    factors = {k: check_factor(k, v) for k, v in factors.items()}
    emb = {k: s.embedding for k, s in subjects.items()}
    check_same_shape(**{f"subject_{k}": e for k, e in emb.items()})
    cats = {k: s.category for k, s in subjects.items()}
    chosen = pick_category(category, cats, custom_category)
    if set(subjects) == {"a", "b"} and set(factors) == {"t"}:
        out = blend(emb["a"], emb["b"], factors["t"], mode)
    elif set(subjects) == {"a", "b", "c", "d"} and set(factors) == {"u", "v"}:
        out = bilinear(emb["a"], emb["b"], emb["c"], emb["d"], factors["u"], factors["v"], mode)
    else:
        raise ValueError(f"need subjects a, b with t, or a, b, c, d with u, v; got {sorted(subjects)} "
                         f"with {sorted(factors)}")
    meta = dict(_shared_meta(subjects), interpolation={
        "mode": mode, **factors, "categories": cats, "sources": {k: s.meta for k, s in subjects.items()}})
    return Subject(out, chosen, meta)
