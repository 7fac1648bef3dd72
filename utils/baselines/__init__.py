"""The methods the paper compares with, on the same pool: PEFT's Arrow, LoraHub, Adapter Soup."""
