"""generate: each row's text is the prompt, wrapped in the chat template when there is one."""

from __future__ import annotations

from pipeline.tasks.base import Task


class GenerateTask(Task):
    name = "generate"
