"""Published weights by name: MMOCR v1.0.1's DBNet / DBNet++ model zoo and pretraining files.

One table (``PUBLISHED``) maps a name to its download URL and what MMOCR published about it:
the MMOCR config name for trained detectors (``dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015``),
the file stem for the SynthText pretraining files that the fine-tuning recipes load, and MMOCR's
own strings for backbone weights (``torchvision://resnet50``, the oCLIP ResNet-50).

``download_weights(name_or_url)`` fetches a file once into torch hub's checkpoint cache
(``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``, where MMOCR,
mmengine and torchvision keep the same files), with a progress bar, checks the SHA-256 prefix
that the file name carries (``...-4ecb39ac.pth``), and moves it into place only when it is
complete and correct. A file already in the cache is used without any network access (and,
as torch hub does, without re-hashing it). Read the result with
``dbnetpp.weights.load_state_dict_file`` (``weights_only``).

Sources: MMOCR v1.0.1 ``configs/textdet/{dbnet,dbnetpp}/metafile.yml`` (URLs, H-mean) and
``README.md`` (precision, recall, test size, the SynthText-pretrained files), the configs
(``load_from``, backbone ``init_cfg``, test ``Resize`` scale, ``DBPostprocessor`` arguments).
"""

import dataclasses
import hashlib
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

__all__ = [
    "ALIASES",
    "DETECTORS",
    "PUBLISHED",
    "PublishedWeights",
    "WeightsUnavailableError",
    "cache_dir",
    "cached_path",
    "download_weights",
    "format_table",
    "get_weights",
    "hash_prefix",
    "is_published",
    "list_models",
    "resolve_name",
]

_DB = "https://download.openmmlab.com/mmocr/textdet/dbnet/"
_DBPP = "https://download.openmmlab.com/mmocr/textdet/dbnetpp/"
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")  # the same rule as torch.hub.HASH_REGEX
_CHUNK = 1 << 20
_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PublishedWeights:
    """One published file and what MMOCR reports for it.

    ``kind``: "detector" (a whole DBNet / DBNet++, loadable with ``load_mmocr_checkpoint`` into
    ``build_model(arch)``) or "backbone" (ImageNet / oCLIP backbone weights for initialisation).
    ``test_scale`` is the (long, short) limit of the recipe's keep-ratio test resize in pixels;
    precision / recall / hmean are MMOCR's published test-set numbers (None: not published).
    """

    name: str
    url: str
    kind: str = "detector"
    arch: Optional[str] = None  # dbnetpp.build_model name
    dataset: str = ""  # what it was trained on ("ICDAR2015", "Total-Text", "SynthText", "ImageNet")
    precision: Optional[float] = None
    recall: Optional[float] = None
    hmean: Optional[float] = None
    test_scale: Optional[Tuple[int, int]] = None
    text_repr_type: str = "quad"  # DBPostprocessor arguments of the recipe
    epsilon_ratio: float = 0.01  # MMOCR's default; the DBNet++ configs set 0.002
    note: str = ""

    @property
    def filename(self) -> str:
        """File name in the cache: the last component of the URL's path."""
        return _filename(self.url)

    @property
    def hash_prefix(self) -> Optional[str]:
        """SHA-256 prefix carried by the file name (``-<hex>.`` before the extension)."""
        return hash_prefix(self.filename)


def _torchvision_url(depth: int) -> str:
    """URL of torchvision's ResNet-``depth`` IMAGENET1K_V1 weights, from torchvision's own enum
    (what mmengine resolves ``torchvision://resnet<depth>`` to)."""
    import torchvision.models as tvm

    enum = {18: tvm.ResNet18_Weights, 50: tvm.ResNet50_Weights}[depth]
    return enum.IMAGENET1K_V1.url


def _entries() -> List[PublishedWeights]:
    icdar, total = "ICDAR2015", "Total-Text"
    r18_scale, r50_scale = (1333, 736), (4068, 1024)
    return [
        # ---- DBNet (DBPostprocessor epsilon_ratio 0.01, MMOCR's default)
        PublishedWeights(
            "dbnet_resnet18_fpnc_1200e_icdar2015",
            _DB + "dbnet_resnet18_fpnc_1200e_icdar2015/"
            "dbnet_resnet18_fpnc_1200e_icdar2015_20220825_221614-7c0e94f2.pth",
            dataset=icdar, precision=0.8853, recall=0.7583, hmean=0.8169, test_scale=r18_scale,
        ),
        PublishedWeights(
            "dbnet_resnet18_fpnc_1200e_totaltext",
            _DB + "dbnet_resnet18_fpnc_1200e_totaltext/dbnet_resnet18_fpnc_1200e_totaltext-3ed3233c.pth",
            dataset=total, precision=0.8640, recall=0.7770, hmean=0.8182, test_scale=r18_scale,
        ),
        PublishedWeights(
            "dbnet_resnet50_1200e_icdar2015",
            _DB + "dbnet_resnet50_1200e_icdar2015/dbnet_resnet50_1200e_icdar2015_20221102_115917-54f50589.pth",
            dataset=icdar, precision=0.8744, recall=0.8276, hmean=0.8504, test_scale=r50_scale,
        ),
        PublishedWeights(
            "dbnet_resnet50-dcnv2_fpnc_1200e_icdar2015",
            _DB + "dbnet_resnet50-dcnv2_fpnc_1200e_icdar2015/"
            "dbnet_resnet50-dcnv2_fpnc_1200e_icdar2015_20220828_124917-452c443c.pth",
            dataset=icdar, precision=0.8784, recall=0.8315, hmean=0.8543, test_scale=r50_scale,
        ),
        PublishedWeights(
            "dbnet_resnet50-oclip_1200e_icdar2015",
            _DB + "dbnet_resnet50-oclip_1200e_icdar2015/"
            "dbnet_resnet50-oclip_1200e_icdar2015_20221102_115917-bde8c87a.pth",
            dataset=icdar, precision=0.9052, recall=0.8272, hmean=0.8644, test_scale=r50_scale,
        ),
        # ---- DBNet++ (epsilon_ratio 0.002)
        PublishedWeights(
            "dbnetpp_resnet50_fpnc_1200e_icdar2015",
            _DBPP + "dbnetpp_resnet50_fpnc_1200e_icdar2015/"
            "dbnetpp_resnet50_fpnc_1200e_icdar2015_20221025_185550-013730aa.pth",
            dataset=icdar, precision=0.9079, recall=0.8209, hmean=0.8622, test_scale=r50_scale, epsilon_ratio=0.002,
        ),
        PublishedWeights(
            "dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015",
            _DBPP + "dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015/"
            "dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015_20220829_230108-f289bd20.pth",
            dataset=icdar, precision=0.9116, recall=0.8291, hmean=0.8684, test_scale=r50_scale, epsilon_ratio=0.002,
        ),
        PublishedWeights(
            "dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015",
            _DBPP + "dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015/"
            "dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015_20221101_124139-4ecb39ac.pth",
            dataset=icdar, precision=0.9174, recall=0.8609, hmean=0.8882, test_scale=r50_scale, epsilon_ratio=0.002,
        ),
        # ---- SynthText pretraining (100k iterations; no test-set numbers published)
        PublishedWeights(
            "dbnet_resnet18_fpnc_100k_synthtext",
            _DB + "dbnet_resnet18_fpnc_100k_synthtext/dbnet_resnet18_fpnc_100k_synthtext-2e9bf392.pth",
            dataset="SynthText", test_scale=r18_scale,
        ),
        PublishedWeights(
            "dbnetpp_resnet50-dcnv2_fpnc_100k_synthtext",
            _DBPP + "dbnetpp_resnet50-dcnv2_fpnc_100k_synthtext/"
            "dbnetpp_resnet50-dcnv2_fpnc_100k_synthtext-00f0a80b.pth",
            dataset="SynthText", test_scale=r50_scale, epsilon_ratio=0.002,
        ),
        # ---- files the fine-tuning recipes name in ``load_from`` (MMOCR's tmp_1.0_pretrain folders)
        PublishedWeights(
            "dbnetpp_r50dcnv2_fpnc_100k_iter_synthtext",
            _DBPP + "tmp_1.0_pretrain/dbnetpp_r50dcnv2_fpnc_100k_iter_synthtext-20220502-352fec8a.pth",
            arch="dbnetpp_resnet50-dcnv2_fpnc_100k_synthtext",
            dataset="SynthText", test_scale=r50_scale, epsilon_ratio=0.002,
            note="load_from of dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015",
        ),
        PublishedWeights(
            "dbnet_r50dcnv2_fpnc_sbn_2e_synthtext",
            _DB + "tmp_1.0_pretrain/dbnet_r50dcnv2_fpnc_sbn_2e_synthtext_20210325-ed322016.pth",
            arch="dbnet_resnet50-dcnv2_fpnc_1200e_icdar2015",
            dataset="SynthText", test_scale=r50_scale,
            note="load_from of dbnet_resnet50-dcnv2_fpnc_1200e_icdar2015",
        ),
        # ---- backbone initialisation (MMOCR's init_cfg checkpoint strings)
        PublishedWeights(
            "torchvision://resnet18", _torchvision_url(18), kind="backbone", dataset="ImageNet",
            note="torchvision ResNet18_Weights.IMAGENET1K_V1",
        ),
        PublishedWeights(
            "torchvision://resnet50", _torchvision_url(50), kind="backbone", dataset="ImageNet",
            note="torchvision ResNet50_Weights.IMAGENET1K_V1",
        ),
        PublishedWeights(
            "resnet50-oclip",
            "https://download.openmmlab.com/mmocr/backbone/resnet50-oclip-7ba0c533.pth",
            kind="backbone", dataset="oCLIP (SynthText + web images)",
            note="CLIPResNet init of the oCLIP DBNet / DBNet++ configs",
        ),
    ]  # fmt: skip


def _table() -> Dict[str, PublishedWeights]:
    table = {}
    for entry in _entries():
        if entry.kind == "detector" and entry.arch is None:
            entry = dataclasses.replace(entry, arch=entry.name)
        table[entry.name] = entry
    return table


# name -> published file (the one table; tests point entries at file:// URLs with monkeypatch)
PUBLISHED: Dict[str, PublishedWeights] = _table()

# MMOCR config names with an H-mean or SynthText weights, in the order of the README table
DETECTORS: Tuple[str, ...] = (
    "dbnet_resnet18_fpnc_1200e_icdar2015",
    "dbnet_resnet18_fpnc_1200e_totaltext",
    "dbnet_resnet50_1200e_icdar2015",
    "dbnet_resnet50-dcnv2_fpnc_1200e_icdar2015",
    "dbnet_resnet50-oclip_1200e_icdar2015",
    "dbnetpp_resnet50_fpnc_1200e_icdar2015",
    "dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015",
    "dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015",
    "dbnet_resnet18_fpnc_100k_synthtext",
    "dbnetpp_resnet50-dcnv2_fpnc_100k_synthtext",
)

# other spellings -> table name: MMOCR's metafile model names (where they differ from the config
# file names), MMOCR's inferencer aliases, the oCLIP URL and the pretraining file names
ALIASES: Dict[str, str] = {
    "dbnet_resnet50_fpnc_1200e_icdar2015": "dbnet_resnet50_1200e_icdar2015",
    "dbnet_resnet50-oclip_fpnc_1200e_icdar2015": "dbnet_resnet50-oclip_1200e_icdar2015",
    "DB_r18": "dbnet_resnet18_fpnc_1200e_icdar2015",
    "DB_r50": "dbnet_resnet50-oclip_1200e_icdar2015",
    "DBNet": "dbnet_resnet50-oclip_1200e_icdar2015",
    "DBPP_r50": "dbnetpp_resnet50_fpnc_1200e_icdar2015",
    "DBNetpp": "dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015",
}


def _filename(url: str) -> str:
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise ValueError(f"URL without a file name: {url}")
    return name


def hash_prefix(filename: str) -> Optional[str]:
    """The SHA-256 prefix in a published file name (``resnet50-0676ba61.pth`` -> ``"0676ba61"``),
    found as torch hub finds it (the first ``-<hex>.``); None when the name carries none."""
    match = _HASH_IN_NAME.search(filename)
    return match.group(1) if match else None


def resolve_name(name: str) -> str:
    """Table name for ``name`` or one of its aliases (also a published file name or URL)."""
    if name in PUBLISHED:
        return name
    if name in ALIASES:
        return ALIASES[name]
    for entry in PUBLISHED.values():
        if name in (entry.url, entry.filename):
            return entry.name
    raise ValueError(
        f"unknown published weights {name!r}; known names: {', '.join(PUBLISHED)} "
        f"(aliases: {', '.join(ALIASES)}); `dbnetpp models` prints the table"
    )


def is_published(name: str) -> bool:
    """Whether ``name`` (or an alias) is in the table."""
    try:
        resolve_name(name)
    except ValueError:
        return False
    return True


def get_weights(name: str) -> PublishedWeights:
    """The table entry of ``name`` (aliases accepted); ValueError listing the names otherwise."""
    return PUBLISHED[resolve_name(name)]


def list_models() -> Dict[str, Optional[float]]:
    """Every MMOCR DBNet / DBNet++ config name with published weights -> its published H-mean
    on its test set (ICDAR 2015 or Total-Text), None where MMOCR published none (SynthText
    pretraining). Any of these names works with ``Detector.from_pretrained`` and
    ``dbnetpp detect --weights``."""
    return {name: PUBLISHED[name].hmean for name in DETECTORS}


def cache_dir() -> Path:
    """torch hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``; default ``~/.cache/torch``)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_path(name_or_url: str) -> Path:
    """Where ``download_weights`` keeps ``name_or_url`` (whether or not it is there yet)."""
    return cache_dir() / _filename(_url_of(name_or_url))


def _url_of(name_or_url: str) -> str:
    if is_published(name_or_url):
        return get_weights(name_or_url).url
    if urllib.parse.urlparse(name_or_url).scheme in ("http", "https", "file"):
        return name_or_url
    resolve_name(name_or_url)  # raises the ValueError that lists the names
    raise AssertionError("unreachable")


class WeightsUnavailableError(OSError):
    """A file that is neither in the cache nor downloadable (offline, URL gone)."""


def download_weights(name_or_url: str, progress: bool = True, *, hint: str = "") -> Path:
    """Path of the published file ``name_or_url`` (a table name, an alias, or an http(s) /
    file:// URL) in torch hub's checkpoint cache, downloading it on first use.

    The download streams into a temporary file beside the target, hashing as it goes; a
    SHA-256 that does not start with the prefix in the file name raises ValueError and the
    temporary file is removed; a good file is moved into place atomically. A cached file is
    used without network access. If the file cannot be fetched, WeightsUnavailableError (an
    OSError) names the file, its URL, the folder to put it in and ``hint`` (e.g. an opt-out flag).
    """
    url = _url_of(name_or_url)
    target = cache_dir() / _filename(url)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    expected = hash_prefix(target.name)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".partial", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _fetch(url, out, progress, target, hint)
        if expected is not None and not digest.startswith(expected):
            raise ValueError(
                f"refused {target.name} downloaded from {url}: its SHA-256 is {digest}, but the file name "
                f"promises a hash starting with {expected} (corrupted or replaced file); nothing was kept in "
                f"{target.parent}"
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cached files are shared like torch hub's
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _fetch(url: str, out, progress: bool, target: Path, hint: str) -> str:
    """Stream ``url`` into the open file ``out`` with a tqdm bar; returns the SHA-256 hex digest."""
    from tqdm import tqdm

    sha256 = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "dbnetpp"})
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            size = response.headers.get("Content-Length")
            with tqdm(
                total=int(size) if size else None,
                desc=target.name,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=not progress,
                file=sys.stderr,
            ) as bar:
                while True:
                    chunk = response.read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    sha256.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as err:  # offline, DNS, HTTP 404, timeout, bad URL
        reason = getattr(err, "reason", None) or err
        message = (
            f"cannot download {target.name} ({reason}) from {url} . Offline: fetch it elsewhere and put it in "
            f"{target.parent}/ (torch hub's checkpoint cache; TORCH_HOME moves it)"
        )
        raise WeightsUnavailableError(message + (f"; or {hint}" if hint else "")) from err
    return sha256.hexdigest()


def format_table(names: Optional[List[str]] = None) -> str:
    """Markdown table of published detectors: name, H-mean, precision, recall, test scale,
    training set and whether the file is already in the local cache."""
    rows = [
        "| model | H-mean | precision | recall | test scale | trained on | cached |",
        "|---|---|---|---|---|---|---|",
    ]

    def num(x: Optional[float]) -> str:
        return "-" if x is None else f"{x:.4f}"

    for name in names if names is not None else DETECTORS:
        e = PUBLISHED[name]
        scale = "-" if e.test_scale is None else f"{e.test_scale[0]}x{e.test_scale[1]}"
        cached = "yes" if (cache_dir() / e.filename).is_file() else "no"
        rows.append(
            f"| {e.name} | {num(e.hmean)} | {num(e.precision)} | {num(e.recall)} | {scale} | {e.dataset} | {cached} |"
        )
    return "\n".join(rows)
