"""Model re-adaptation against adversarial inputs (the paper's RQ3).

A trained model is fine-tuned on clean and adversarial samples together, minimising
``CE(f(x), y) + CE(f(x_adv), y)``, while only some parameters learn:

* NeuSemSlice / global / category-wise slices: only the slice's critical neurons (plus the
  classifier head) train, through :class:`neuslice.maintenance.masked_optimizer.MaskedOptimizer`;
* full training (``slice=None``): every parameter trains.

Metrics (:func:`evaluate_readaptation`):

* **TPR** (training parameter ratio): fraction of parameter entries allowed to change,
  :func:`neuslice.maintenance.masked_optimizer.trainable_fraction` (1.0 for full training);
* **RA** (retrained accuracy): accuracy of the *re-adapted* model on the held-out adversarial
  test samples that were generated against the *original* model;
* **RAA** (re-attack accuracy): accuracy of the re-adapted model on *new* adversarial samples
  generated against the re-adapted model itself (same attack settings);
* **clean accuracy**: accuracy of the re-adapted model on the clean test samples.

Attacks come from ``torchattacks``, which works on images in [0, 1]. neuslice's datasets are
normalised, ``(pixel - mean) / std``, so :func:`make_attack` takes that ``mean``/``std``:
the inputs are de-normalised to [0, 1] (and clipped there), the attack runs on
``NormalizedModel(model, mean, std)`` (which re-applies the normalisation before the model),
and the adversarial images are normalised again. ``eps`` and ``alpha`` are therefore in
pixel units ([0, 1] scale) and the perturbed images always stay valid images.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable, Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from tqdm import tqdm

from .._utils.hooks import module_modes
from ..layers import model_fingerprint
from .masked_optimizer import MaskedOptimizer, _check_train, trainable_fraction
from ..slicing import Slice
from .._utils.training import evaluate, make_loader
from .._utils.checks import model_device

__all__ = [
    "ATTACKS",
    "DEFAULT_EPS",
    "NormalizedModel",
    "normalize",
    "denormalize",
    "Attack",
    "make_attack",
    "adversarial_dataset",
    "readapt",
    "ReadaptResult",
    "evaluate_readaptation",
]

ATTACKS = ("fgsm", "pgd")
# Per-kind default L-inf budget in [0, 1] pixel units (MNIST-style data).
DEFAULT_EPS = {"fgsm": 0.2, "pgd": 0.3}
DEFAULT_PGD_STEPS = 10  # the classic MNIST setting is 40 steps of 0.01; 10 keeps CPU runs fast

Stats = float | Sequence[float]


# ---------------------------------------------------------------------------- normalisation
def _stats_tensor(value: Stats, what: str) -> torch.Tensor:
    if isinstance(value, bool):
        raise TypeError(
            f"{what} must be a float or a sequence of per-channel floats, got {value!r}"
        )
    if isinstance(value, (int, float)):
        values = [float(value)]
    elif isinstance(value, torch.Tensor):
        values = [float(v) for v in value.detach().reshape(-1).tolist()]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        try:
            values = [float(v) for v in value]
        except (TypeError, ValueError):
            raise TypeError(f"{what} must hold numbers, got {value!r}") from None
    else:
        raise TypeError(
            f"{what} must be a float or a sequence of per-channel floats, "
            f"got {type(value).__name__}"
        )
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what} must hold at least one finite number, got {value!r}")
    if what == "std" and min(values) <= 0:
        raise ValueError(f"std must be positive, got {value!r}")
    return torch.tensor(values, dtype=torch.float32)


def _broadcast(stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-channel statistics shaped to broadcast over ``(N, C, ...)`` inputs."""
    if stat.numel() == 1:
        return stat.reshape(()).to(device=x.device, dtype=x.dtype)
    if x.dim() < 2 or x.shape[1] != stat.numel():
        raise ValueError(
            f"{stat.numel()} per-channel statistics do not match inputs of shape "
            f"{tuple(x.shape)} (channels are dim 1)"
        )
    return stat.reshape(1, -1, *([1] * (x.dim() - 2))).to(device=x.device, dtype=x.dtype)


def normalize(x: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """``(x - mean) / std``, per channel (dim 1) when ``mean``/``std`` are sequences."""
    m, s = _stats_tensor(mean, "mean"), _stats_tensor(std, "std")
    return (x - _broadcast(m, x)) / _broadcast(s, x)


def denormalize(x: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """``x * std + mean``: the inverse of :func:`normalize` (no clipping)."""
    m, s = _stats_tensor(mean, "mean"), _stats_tensor(std, "std")
    return x * _broadcast(s, x) + _broadcast(m, x)


class NormalizedModel(nn.Module):
    """``model`` preceded by ``(x - mean) / std``: takes [0, 1] images, feeds the model the
    normalised ones. Holds a reference to ``model`` (not a copy)."""

    def __init__(self, model: nn.Module, mean: Stats, std: Stats) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.register_buffer("mean", _stats_tensor(mean, "mean"), persistent=False)
        self.register_buffer("std", _stats_tensor(std, "std"), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - _broadcast(self.mean, x)) / _broadcast(self.std, x))


# -------------------------------------------------------------------------------- attacks
def _import_torchattacks() -> Any:
    try:
        import torchattacks
    except ImportError as exc:
        raise ImportError(
            "adversarial attacks need torchattacks; install it with "
            '`pip install "neuslice[readapt]"` (torchattacks and torchvision)'
        ) from exc
    return torchattacks


def _check_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return value


def _check_pos_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


class Attack:
    """A configured L-inf attack on ``model``: ``attack(x, y) -> x_adv`` (see :func:`make_attack`).

    Inputs and outputs are in the model's input space (normalised when ``mean``/``std`` are
    set). Each call runs the model in eval mode and restores every module's train/eval flag;
    parameters and their ``.grad`` are untouched. PGD's random start draws from a private RNG
    stream (``seed`` + call index), so the global RNG is not consumed.
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str,
        eps: float,
        alpha: float | None,
        steps: int,
        mean: Stats | None,
        std: Stats | None,
        random_start: bool,
        seed: int,
    ) -> None:
        self.model = model
        self.kind = kind
        self.eps = eps
        self.alpha = alpha
        self.steps = steps
        self.mean = mean
        self.std = std
        self.random_start = random_start
        self.seed = seed
        self._calls = 0
        ta = _import_torchattacks()
        target = model if mean is None else NormalizedModel(model, mean, std)  # type: ignore[arg-type]
        if kind == "fgsm":
            self._attack = ta.FGSM(target, eps=eps)
        else:
            self._attack = ta.PGD(
                target, eps=eps, alpha=alpha, steps=steps, random_start=random_start
            )

    def __repr__(self) -> str:
        extra = f", alpha={self.alpha}, steps={self.steps}" if self.kind == "pgd" else ""
        return f"Attack({self.kind}, eps={self.eps}{extra})"

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space inputs as [0, 1] images (de-normalised, clipped)."""
        if self.mean is None:
            return x.clamp(0, 1)
        return denormalize(x, self.mean, self.std).clamp(0, 1)  # type: ignore[arg-type]

    def from_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images in the model's input space."""
        return x if self.mean is None else normalize(x, self.mean, self.std)  # type: ignore[arg-type]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(
                f"attack(x, y) needs tensors, got {type(x).__name__} and {type(y).__name__}"
            )
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x holds {x.shape[0]} samples but y {y.shape[0]} labels")
        dev = model_device(self.model)
        self._attack.set_device(dev)
        pixels = self.to_pixels(x.detach().to(dev, torch.float32))
        devices = [dev.index or 0] if dev.type == "cuda" else []
        with module_modes(self.model, train=False), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + self._calls)
            adv = self._attack(pixels, y.detach().to(dev).long())
        self._calls += 1
        return self.from_pixels(adv.detach()).to(device=x.device, dtype=x.dtype)


def make_attack(
    model: nn.Module,
    kind: str = "pgd",
    eps: float | None = None,
    alpha: float | None = None,
    steps: int = DEFAULT_PGD_STEPS,
    mean: Stats | None = None,
    std: Stats | None = None,
    random_start: bool = True,
    seed: int = 0,
) -> Attack:
    """An L-inf ``torchattacks`` attack on ``model`` as a callable ``(x, y) -> x_adv``.

    ``kind`` is ``"fgsm"`` or ``"pgd"``. ``eps`` (default :data:`DEFAULT_EPS`: 0.2 for FGSM,
    0.3 for PGD) and ``alpha`` (PGD step, default ``eps / 4``) are in [0, 1] pixel units;
    PGD runs ``steps`` iterations (default 10, a fast CPU variant of the classic 40 x 0.01).
    Give the dataset's ``mean``/``std`` (floats or per-channel sequences) when the model takes
    normalised inputs, e.g. ``MNIST_MEAN``/``MNIST_STD``; leave both None for [0, 1] inputs.
    The attack keeps a reference to ``model`` and always attacks its current weights.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(kind, str) or kind.lower() not in ATTACKS:
        raise ValueError(f"unknown attack kind {kind!r}; choose one of {list(ATTACKS)}")
    kind = kind.lower()
    eps = DEFAULT_EPS[kind] if eps is None else _check_number(eps, "eps")
    if not 0 < eps <= 1:
        raise ValueError(
            f"eps is an L-inf budget in [0, 1] pixel units and must be in (0, 1], got {eps}"
        )
    if kind == "pgd":
        alpha = eps / 4 if alpha is None else _check_number(alpha, "alpha")
        if alpha <= 0:
            raise ValueError(f"alpha (the PGD step size) must be positive, got {alpha}")
        steps = _check_pos_int(steps, "steps")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (the dataset's normalisation) or neither")
    if mean is not None:
        _stats_tensor(mean, "mean")
        _stats_tensor(std, "std")  # type: ignore[arg-type]
    if not isinstance(random_start, bool):
        raise TypeError(f"random_start must be a bool, got {random_start!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    return Attack(
        model, kind, eps, alpha if kind == "pgd" else None, steps, mean, std, random_start, seed
    )


def adversarial_dataset(
    model: nn.Module,
    dataset: Dataset,
    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int = 256,
) -> TensorDataset:
    """``TensorDataset(x_adv, y)`` on the CPU, in the same order and input space as ``dataset``.

    ``attack`` is a callable ``(x, y) -> x_adv`` (e.g. :func:`make_attack` on ``model``); the
    model runs in eval mode and its train/eval flags are restored afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(attack):
        raise TypeError(
            f"attack must be a callable (x, y) -> x_adv such as "
            f"make_attack(model), got {type(attack).__name__}"
        )
    if isinstance(attack, Attack) and attack.model is not model:
        raise ValueError("attack was built for a different model; use make_attack(model, ...)")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("dataset is empty")
    xs, ys = [], []
    with module_modes(model, train=False):
        for x, y in make_loader(dataset, batch_size=batch_size):
            adv = attack(x, y)
            if not isinstance(adv, torch.Tensor) or adv.shape != x.shape:
                raise ValueError(
                    f"attack must return a tensor shaped like its input "
                    f"{tuple(x.shape)}, got "
                    f"{getattr(adv, 'shape', type(adv).__name__)}"
                )
            xs.append(adv.detach().cpu())
            ys.append(y.detach().cpu())
    return TensorDataset(torch.cat(xs), torch.cat(ys))


# ---------------------------------------------------------------------------- re-adaptation
class _Paired(Dataset):
    """Item i: (clean x, clean y, adversarial x, adversarial y)."""

    def __init__(self, clean: Dataset, adv: Dataset) -> None:
        self.clean, self.adv = clean, adv

    def __len__(self) -> int:
        return len(self.clean)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any, Any, Any]:
        return (*self.clean[i], *self.adv[i])


def _check_pair(clean: Dataset, adv: Dataset, what: str) -> None:
    for name, ds in ((f"clean_{what}", clean), (f"adv_{what}", adv)):
        if not isinstance(ds, Dataset):
            raise TypeError(f"{name} must be a torch.utils.data.Dataset, got {type(ds).__name__}")
    n_clean, n_adv = len(clean), len(adv)  # type: ignore[arg-type]
    if n_clean != n_adv:
        raise ValueError(
            f"clean_{what} has {n_clean} samples but adv_{what} {n_adv}; sample i "
            f"of adv_{what} must be the adversarial version of sample i of "
            f"clean_{what} (use adversarial_dataset(model, clean_{what}, attack))"
        )
    if n_clean == 0:
        raise ValueError(f"clean_{what} and adv_{what} are empty")


def _batches(
    clean: Dataset, adv: Dataset, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    for xc, yc, xa, ya in make_loader(
        _Paired(clean, adv), batch_size=batch_size, shuffle=True, seed=seed
    ):
        if not torch.equal(yc, ya):
            raise ValueError(
                "clean and adversarial training labels differ at the same index; "
                "adv_train must follow clean_train's order (build it with "
                "adversarial_dataset(model, clean_train, attack))"
            )
        yield xc, xa, yc


def readapt(
    model: nn.Module,
    slice: Slice | None,
    clean_train: Dataset,
    adv_train: Dataset,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 128,
    train: str = "critical",
    seed: int = 0,
    progress: bool = False,
    device: str | torch.device | None = None,
    optimizer: Callable[[Iterable[nn.Parameter]], Any] | None = None,
) -> nn.Module:
    """Fine-tune a deep copy of ``model`` on ``CE(f(x), y) + CE(f(x_adv), y)`` with Adam
    (``lr``), or with ``optimizer(parameters)`` when given (any ``torch.optim`` factory, e.g.
    ``lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)``).

    Sample i of ``adv_train`` must be the adversarial version of sample i of ``clean_train``;
    each batch pairs them (one seeded shuffle). ``slice=None`` trains every parameter (full
    training); otherwise :class:`~neuslice.maintenance.masked_optimizer.MaskedOptimizer` with ``train`` ("critical":
    only the slice's critical neurons and the head; "noncritical": the others) keeps the
    remaining entries bit-identical. ``device=None`` uses the model's device. Returns the copy
    in eval mode; ``model`` itself is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if slice is not None and not isinstance(slice, Slice):
        raise TypeError(
            f"slice must be a neuslice.Slice or None (full training), got {type(slice).__name__}"
        )
    train = _check_train(train)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    lr = _check_number(lr, "lr")
    if lr <= 0:
        raise ValueError(f"lr must be positive (e.g. 1e-3), got {lr}")
    batch_size = _check_pos_int(batch_size, "batch_size")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    _check_pair(clean_train, adv_train, "train")

    adapted = copy.deepcopy(model)
    dev = model_device(model) if device is None else torch.device(device)
    adapted.to(dev)
    if optimizer is not None and not callable(optimizer):
        raise TypeError(
            "optimizer must be a callable parameters -> torch.optim.Optimizer, e.g. "
            "lambda ps: torch.optim.SGD(ps, lr=0.01)"
        )
    make = optimizer or (lambda ps: torch.optim.Adam(ps, lr=lr))
    optimizer = make(adapted.parameters())
    if slice is not None:
        optimizer = MaskedOptimizer(optimizer, adapted, slice, train=train)
    adapted.train()
    for epoch in tqdm(range(epochs), desc="readapt", unit="epoch", disable=not progress):
        for xc, xa, y in _batches(clean_train, adv_train, batch_size, seed + epoch):
            xc, xa, y = xc.to(dev), xa.to(dev), y.to(dev)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(adapted(xc), y) + F.cross_entropy(adapted(xa), y)
            loss.backward()
            optimizer.step()
    return adapted.eval()


# ------------------------------------------------------------------------------- evaluation
@dataclass
class ReadaptResult:
    """One re-adaptation run: TPR, RA, RAA and clean accuracy (all in [0, 1])."""

    method: str
    tpr: float
    ra: float
    raa: float
    clean_accuracy: float


def evaluate_readaptation(
    original: nn.Module,
    adapted: nn.Module,
    slice: Slice | None,
    test_clean: Dataset,
    test_adv: Dataset,
    attack_factory: Callable[[nn.Module], Callable[..., torch.Tensor]],
    method: str | None = None,
    train: str = "critical",
    batch_size: int = 256,
) -> ReadaptResult:
    """Score ``adapted`` (re-adapted from ``original`` with ``slice``; None = full training).

    ``test_adv`` holds the adversarial versions of ``test_clean`` made against ``original``
    (RA); ``attack_factory(adapted)`` builds the attack for the re-attack (RAA), e.g.
    ``lambda m: make_attack(m, "pgd", mean=MNIST_MEAN, std=MNIST_STD)``. TPR is
    ``trainable_fraction(original, slice, train)``, 1.0 when ``slice`` is None. ``method``
    defaults to the slice's strategy, or ``"full"``.
    """
    for name, m in (("original", original), ("adapted", adapted)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
    if model_fingerprint(original) != model_fingerprint(adapted):
        raise ValueError(
            "adapted must have the original model's architecture (layer names, "
            "shapes and types differ)"
        )
    if slice is not None and not isinstance(slice, Slice):
        raise TypeError(
            f"slice must be a neuslice.Slice or None (full training), got {type(slice).__name__}"
        )
    if not callable(attack_factory):
        raise TypeError(
            "attack_factory must be a callable model -> attack, e.g. "
            "lambda m: make_attack(m, 'pgd')"
        )
    train = _check_train(train)
    _check_pair(test_clean, test_adv, "test")
    if method is None:
        method = "full" if slice is None else slice.strategy
    tpr = 1.0 if slice is None else trainable_fraction(original, slice, train)
    ra = evaluate(adapted, test_adv, batch_size=batch_size)
    clean = evaluate(adapted, test_clean, batch_size=batch_size)
    re_adv = adversarial_dataset(
        adapted, test_clean, attack_factory(adapted), batch_size=batch_size
    )
    raa = evaluate(adapted, re_adv, batch_size=batch_size)
    return ReadaptResult(method=str(method), tpr=tpr, ra=ra, raa=raa, clean_accuracy=clean)
