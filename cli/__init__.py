"""The zsadapt command-line interface (click)."""
