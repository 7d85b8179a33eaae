"""Training: one trainer loop for every stage (pretrain, SFT, GRPO), recipes, checkpoints, distribution."""
