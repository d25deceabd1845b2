"""Sources of draft candidates behind one interface (`base.Drafter`): `castspec.draft.DraftLM` (a small LM),
`suffix.SuffixDrafter` (draft-free, from repeats in the prompt and output), `suffix.MixedDrafter` (both merged per
node) and `lazy.LazyDraft` (the suffix drafter first, the draft model once it has earned its prefill)."""
