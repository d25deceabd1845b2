"""Sources of draft candidates. Today: `castspec.draft.DraftLM` (a small LM) and `suffix.SuffixIndex` (draft-free,
from repeats in the prompt and output; not yet wired into the engine, issue 15)."""
