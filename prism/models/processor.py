"""Qwen-VL processors that build and load where torchvision is missing.

transformers' Qwen2-VL / Qwen2.5-VL / Qwen3-VL processors own a video processor, and every video
processor needs torchvision. Without it `AutoProcessor.from_pretrained` fails even for image-only
work. Here, when torchvision is missing, the processor is assembled from its parts (tokenizer,
the PIL image processor, chat template) with `VideoUnavailable` standing in for the video
processor: images work exactly as usual, videos raise a clear error. Where torchvision is present
the stock `AutoProcessor` path is used unchanged.

Two settings shape what the processor makes of an example, and both are applied here, to the one
processor every consumer uses (collation, corpus lengths, every sampler's prompts, the discriminator):

- the chat template (`model.chat_template`): the checkpoint's own (`auto`), prism's ChatML (`chatml`: Qwen's
  markup as the Instruct templates render it, for a checkpoint whose template does not fit), or a Jinja
  file. Whichever it is, a probe renders a PRISM response and stops with one line if the template does not
  reproduce it as written: Qwen3's Thinking templates cut an assistant turn at `</think>`, keep only what
  follows `<think>` as its reasoning (PRISM's `<caption>` is lost from inputs and labels alike) and open
  `<think>` in the generation prompt;
- the image pixel bounds (`data.image_min_pixels` / `data.image_max_pixels`): the image processor's own
  `size` (shortest_edge / longest_edge, in pixels), from which it resizes every image (transformers'
  `smart_resize`, qwen-vl-utils' rule: sides multiples of patch x merge, area within the bounds, aspect kept)
  and counts its tokens. vLLM gets the same bounds (`prism.rollout.vllm_engine`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.image_utils import SizeDict
from transformers.utils import PushToHubMixin, is_torchvision_available

from prism.core.errors import ConfigError, DataError
from prism.models.families import family_of
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

# prism's ChatML: Qwen's markup of system / user / assistant turns, images as <|vision_start|><|image_pad|>
# <|vision_end|>, rendered as Qwen3-VL's Instruct template renders them (tests/families checks it against the
# published one) but with no default system prompt and no tools. The assistant turn sits inside
# {% generation %}, so that `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the
# tokens a model must learn to produce, closing <|im_end|> included.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{%- for part in parts -%}{{- part['text'] -}}{%- endfor -%}"
    "{{- '<|im_end|>' -}}{% endgeneration %}"
    "{%- else -%}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{{- '<|im_end|>' -}}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE}
"""Built-in `model.chat_template` choices besides `auto` and a file."""
PROBE_TURNS = ("<caption>a grid</caption><think>two cells</think><answer>2</answer>",
               "<caption>one row</caption><think>three</think><answer>3</answer>")
"""Assistant turns the template probe renders (PRISM responses, `check_chat_template`)."""


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


def load_processor(path: str | Path, trust_remote_code: bool = False, key: str = "model.path", *,
                   chat_template: str = "auto", template_key: str = "model.chat_template",
                   min_pixels: int | None = None, max_pixels: int | None = None):
    """Load the processor of a local Qwen-VL checkpoint (with or without torchvision), with the chat template
    `chat_template` (`use_chat_template`; `template_key` is the setting that chose it) and the image pixel
    bounds `min_pixels` / `max_pixels` (`set_image_pixels`; None: the checkpoint's).

    Any fault (missing directory, missing tokenizer or image-processor files, a corrupt file) is one
    line naming `key` (the config key or flag that gave `path`) and the directory or file.
    """
    processor = _read_processor(path, trust_remote_code, key)
    use_chat_template(processor, chat_template, template_key, where=path)
    set_image_pixels(processor, min_pixels, max_pixels)
    return processor


def _read_processor(path: str | Path, trust_remote_code: bool, key: str):
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
        family = family_of(str(_read_json(path / "config.json", key).get("model_type", "")))
        class_name = family.processor_class if family is not None else None
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


def use_chat_template(processor, choice: str, key: str = "model.chat_template", where: str | Path = "") -> None:
    """Give `processor` the chat template `choice`: `auto` (keep the checkpoint's), `chatml` (`CHATML_TEMPLATE`)
    or the path of a Jinja file; then `check_chat_template`. A ConfigError naming `key` for a file that is
    missing or a template that does not fit."""
    if choice in CHAT_TEMPLATES:
        processor.chat_template = CHAT_TEMPLATES[choice]
    elif choice != "auto":
        file = Path(choice)
        if not file.is_file():
            raise ConfigError(f"{key}: {choice!r} is neither auto, {', '.join(CHAT_TEMPLATES)} nor a template file")
        processor.chat_template = file.read_text()
    if not getattr(processor, "chat_template", None):
        raise ConfigError(f"{key}: {where or 'the processor'} has no chat template; set {key}=chatml")
    check_chat_template(processor, key, where)


def check_chat_template(processor, key: str = "model.chat_template", where: str | Path = "") -> None:
    """Stop (ConfigError, one line naming `key`) unless the processor's chat template renders PRISM's assistant
    turns as written: for each turn of a two-round probe conversation (system, image), the rendering up to
    the turn with the generation prompt must be a prefix of the rendering with it, followed by the turn's text
    verbatim; and no later turn may rewrite it. This is what prism's label masks and rollouts rely on."""
    def render(messages, prompt=False):
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    def text(t):
        return [{"type": "text", "text": t}]

    probe = [{"role": "system", "content": text("Answer in the PRISM format.")},
             {"role": "user", "content": [{"type": "image"}, *text("How many cells are red?")]},
             {"role": "assistant", "content": text(PROBE_TURNS[0])},
             {"role": "user", "content": text("And how many rows?")},
             {"role": "assistant", "content": text(PROBE_TURNS[1])}]
    try:
        full = render(probe)
        for i, m in enumerate(probe):
            if m["role"] != "assistant":
                continue
            prompt, upto = render(probe[:i], prompt=True), render(probe[:i + 1])
            turn = m["content"][0]["text"]
            if not (upto.startswith(prompt) and upto[len(prompt):].startswith(turn) and full.startswith(upto)):
                shown = upto[len(prompt):] if upto.startswith(prompt) else upto[-len(turn) - 40:]
                raise ConfigError(
                    f"{key}: the chat template of {where or 'the processor'} does not render an assistant turn as "
                    f"written ({turn!r} comes out as {shown!r} after the generation prompt {prompt[-30:]!r}): a "
                    f"Thinking template cuts a turn at </think>, drops PRISM's <caption> and opens <think> in the "
                    f"generation prompt; set {key}=chatml (Qwen's ChatML, as the Instruct templates render these "
                    "turns) or a template file that renders turns verbatim")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a template that fails to render at all (jinja errors, raise_exception)
        raise ConfigError(f"{key}: the chat template of {where or 'the processor'} cannot render a conversation "
                          f"with a system prompt, an image and two rounds ({type(e).__name__}: {first_line(e)})"
                          ) from None


def image_pixels(processor) -> tuple[int, int]:
    """The (min, max) pixels every image is resized into (the image processor's size bounds)."""
    size = processor.image_processor.size
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    return int(get("shortest_edge")), int(get("longest_edge"))


def set_image_pixels(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Resize every image into [min_pixels, max_pixels] pixels (None: keep the processor's bound): the image
    processor's `size`, which both its resizing and its token count read."""
    if min_pixels is None and max_pixels is None:
        return
    lo, hi = image_pixels(processor)
    lo, hi = min_pixels if min_pixels is not None else lo, max_pixels if max_pixels is not None else hi
    if lo > hi:
        raise ConfigError(f"data.image_min_pixels: {lo} is above the largest image size allowed, {hi} pixels "
                          "(data.image_max_pixels, or the processor's own bound)")
    processor.image_processor.size = SizeDict(shortest_edge=lo, longest_edge=hi)
