"""The Textual terminal UI over the engine: the only part of llmtop that imports Textual."""
