"""Qwen-VL processors that build and load where torchvision is missing.

transformers' Qwen2-VL / Qwen2.5-VL / Qwen3-VL processors own a video processor, and every video
processor needs torchvision. Without it `AutoProcessor.from_pretrained` fails even for image-only
work. Here, when torchvision is missing, the processor is assembled from its parts (tokenizer,
the PIL image processor, chat template) with `VideoUnavailable` standing in for the video
processor: images work exactly as usual, videos raise a clear error. Where torchvision is present
the stock `AutoProcessor` path is used unchanged.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.utils import PushToHubMixin, is_torchvision_available

from prism.core.errors import ConfigError, DataError
from prism.models.loader import first_line, read_json_object

PROCESSOR_FILE = "processor_config.json"
VIDEO_FILE = "video_preprocessor_config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
"""Either of these holds a Qwen tokenizer's vocabulary (fast, or slow BPE)."""
JSON_FILES = ("config.json", TOKENIZER_CONFIG_FILE, PROCESSOR_FILE, PREPROCESSOR_FILE, VIDEO_FILE, CHAT_TEMPLATE_JSON)
"""The small JSON files a processor is read from (tokenizer.json, large, is left to the tokenizer)."""


class VideoUnavailable(PushToHubMixin):  # the mixin marks it as serialisable for save_pretrained
    """Stand-in for a video processor where torchvision is missing.

    It keeps the video processor's saved settings (so `save_pretrained` writes them back unchanged
    and a machine with torchvision loads the real one) and raises on use.
    """

    _auto_class = None

    def __init__(self, settings: dict[str, Any] | None = None):
        self.settings = dict(settings or {})
        self.merge_size = self.settings.get("merge_size", 2)
        self.temporal_patch_size = self.settings.get("temporal_patch_size", 2)
        self.patch_size = self.settings.get("patch_size", 16)

    def __call__(self, *args, **kwargs):
        raise RuntimeError("video inputs need torchvision, which is not installed (pip install torchvision)")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.settings)


@lru_cache(maxsize=None)
def _image_only(processor_cls: type) -> type:
    """A subclass of `processor_cls` that accepts `VideoUnavailable` as its video processor."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if isinstance(argument, VideoUnavailable):
            return VideoUnavailable
        return processor_cls.check_argument_for_proper_class(self, argument_name, argument)

    # Same __name__ so that save_pretrained records the stock class in processor_config.json.
    return type(processor_cls.__name__, (processor_cls,), {
        "check_argument_for_proper_class": check_argument_for_proper_class,
        "__module__": processor_cls.__module__,
    })


def build_processor(processor_cls: type, image_processor, tokenizer, video_settings: dict | None, chat_template):
    """Instantiate `processor_cls`; with a stand-in video processor if torchvision is missing."""
    if is_torchvision_available() and video_settings is not None:
        video_cls = getattr(transformers, video_settings.get("video_processor_type", ""), None)
        if video_cls is not None:
            settings = {k: v for k, v in video_settings.items() if k != "video_processor_type"}
            video = video_cls(**settings)
            return processor_cls(image_processor, tokenizer, video, chat_template=chat_template)
    return _image_only(processor_cls)(
        image_processor, tokenizer, VideoUnavailable(video_settings), chat_template=chat_template
    )


def _read_json(path: Path, key: str = "model.path") -> dict:
    return read_json_object(path, key) if path.is_file() else {}


def missing_processor_files(path: Path, key: str = "model.path") -> list[str]:
    """What a processor directory lacks: the tokenizer's files, the image processor's settings."""
    missing = []
    if not any(all((path / f).is_file() for f in files) for files in TOKENIZER_FILES):
        missing.append(" or ".join(" + ".join(files) for files in TOKENIZER_FILES))
    if not (path / TOKENIZER_CONFIG_FILE).is_file():  # without it the EOS token silently falls back
        missing.append(TOKENIZER_CONFIG_FILE)
    if not (path / PREPROCESSOR_FILE).is_file() and not _read_json(path / PROCESSOR_FILE, key).get("image_processor"):
        missing.append(f"{PREPROCESSOR_FILE} (or an image_processor entry in {PROCESSOR_FILE})")
    return missing


def load_processor(path: str | Path, trust_remote_code: bool = False, key: str = "model.path"):
    """Load the processor of a local Qwen-VL checkpoint (with or without torchvision).

    Any fault (missing directory, missing tokenizer or image-processor files, a corrupt file) is one
    line naming `key` (the config key or flag that gave `path`) and the directory or file.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{key}: {path} is not a directory")
    for name in JSON_FILES:
        _read_json(path / name, key)  # a corrupt one: one line naming it
    missing = missing_processor_files(path, key)
    if missing:
        raise DataError(f"{key}: {path} has no usable processor (tokenizer / image processor): "
                        f"missing {'; '.join(missing)}")
    try:
        return _load_processor(path, trust_remote_code, key)
    except (ConfigError, DataError):
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"{key}: {path} has no usable processor (tokenizer / image processor): "
                        f"{first_line(e)}") from None


def _load_processor(path: Path, trust_remote_code: bool, key: str):
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)

    proc_cfg = _read_json(path / PROCESSOR_FILE, key)
    pre_cfg = _read_json(path / PREPROCESSOR_FILE, key)
    class_name = proc_cfg.get("processor_class") or pre_cfg.get("processor_class")
    if class_name is None:
        model_type = _read_json(path / "config.json", key).get("model_type", "")
        class_name = {
            "qwen2_vl": "Qwen2VLProcessor",
            "qwen2_5_vl": "Qwen2_5_VLProcessor",
            "qwen3_vl": "Qwen3VLProcessor",
            "qwen3_vl_moe": "Qwen3VLProcessor",
        }.get(model_type)
    processor_cls = getattr(transformers, class_name or "", None)
    if processor_cls is None:
        raise DataError(f"{key}: {path} has no usable processor (no {PROCESSOR_FILE} or {PREPROCESSOR_FILE} "
                        "naming a processor class)")

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    video_settings = proc_cfg.get("video_processor") or _read_json(path / VIDEO_FILE, key) or None
    chat_template = None
    if (path / CHAT_TEMPLATE_FILE).is_file():
        chat_template = (path / CHAT_TEMPLATE_FILE).read_text()
    elif (path / CHAT_TEMPLATE_JSON).is_file():
        chat_template = _read_json(path / CHAT_TEMPLATE_JSON, key).get("chat_template")
    chat_template = chat_template or getattr(tokenizer, "chat_template", None)
    return build_processor(processor_cls, image_processor, tokenizer, video_settings, chat_template)
