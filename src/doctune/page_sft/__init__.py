"""Page SFT: a vision-language model fine-tuned to turn a rendered page into its JSON fields."""
