"""LoRA-PT and baseline PEFT methods (installed as tsvd.peft)."""
