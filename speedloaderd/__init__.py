"""speedloaderd: keeps hot LLM models in RAM pools; cold storage stays the master copy."""

__version__ = "0.1.0"
