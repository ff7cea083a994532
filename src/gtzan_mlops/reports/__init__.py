"""Markdown tables and figures the stages and the report write."""
