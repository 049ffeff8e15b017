"""``python -m bench``: memory and throughput of bonekern against PEFT and the plain linear layer."""
