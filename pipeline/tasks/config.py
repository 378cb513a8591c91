"""`task.*`: what the tasks read from the config, next to the tasks (as `engine.*` sits in
`pipeline/engine/config.py`); `pipeline/config.py` puts it in the job's config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline.engine.config import ConfigError

TRANSLATE_TEMPLATE = (
    "Translate from {source_lang} to {target_lang}.\n{source_lang}: {text}\n{target_lang}:"
)
CHAT_TRANSLATE_TEMPLATE = (
    "Translate the following text from {source_lang} to {target_lang}. "
    "Reply with the translation only.\n\n{text}"
)


@dataclass
class TaskConfig:
    name: str = "translate"  # set by `+job=NAME`
    source_lang: str = "English"
    target_lang: str = "German"
    prompt_template: str = TRANSLATE_TEMPLATE  # decoder-only models without a chat template
    chat_prompt: str = CHAT_TRANSLATE_TEMPLATE  # the user message when a chat template is used
    chat_template: str = "auto"  # auto (when the tokenizer has one) | always | never
    system_prompt: Optional[str] = None  # noqa: UP045

    def __post_init__(self) -> None:
        # The registry imports every task, and the tasks import this module: look it up
        # when a config is built, not when this module is imported.
        from pipeline.tasks import TASKS

        if self.name not in TASKS:
            raise ConfigError(
                f"task.name must be one of {sorted(TASKS)} (`+job=NAME`), got {self.name!r}"
            )
        if self.chat_template not in ("auto", "always", "never"):
            raise ConfigError(
                f"task.chat_template must be auto, always or never, got {self.chat_template!r}"
            )
        for key in ("prompt_template", "chat_prompt"):
            if "{text}" not in getattr(self, key):
                raise ConfigError(
                    f"task.{key} must contain the placeholder {{text}}, got {getattr(self, key)!r}"
                )
