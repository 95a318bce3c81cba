"""Compatibility with SGLang's user-facing surface (launch flags) where it is not simply kvyard's
own name for the same thing."""
