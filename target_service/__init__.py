"""TargetService: the large model verifying windows of draft tokens for many sessions at once."""
