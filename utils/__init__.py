"""Pipeline stages of the LoraRetriever evaluation: one module per stage."""
