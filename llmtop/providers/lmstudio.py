"""LM Studio's OpenAI-compatible server: no health endpoint, so a models request is the health check."""

from llmtop.providers import register
from llmtop.providers.openai import OpenAICompatible


@register
class LMStudio(OpenAICompatible):
    provider = "lmstudio"
