"""translate: source text in `input.text_column`, `task.source_lang` -> `task.target_lang`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.tasks.base import PromptFormat, Task

if TYPE_CHECKING:
    from pipeline.engine.outputs import CompletionOutput


class TranslateTask(Task):
    name = "translate"

    def prompt_text(self, text: str, fmt: PromptFormat) -> str:
        if fmt == "raw":  # encoder-decoder translation models read the source alone
            return text
        template = self.cfg.chat_prompt if fmt == "chat" else self.cfg.prompt_template
        return template.format(
            source_lang=self.cfg.source_lang, target_lang=self.cfg.target_lang, text=text
        )

    def output_text(self, best: CompletionOutput) -> str:
        return best.text.strip()  # the template leaves a space after "German:"
