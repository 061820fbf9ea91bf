"""One file per screen: the three modes (prompt, train, checkpoints) and the dialogs."""
