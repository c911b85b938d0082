"""Leaderboards (Markdown, LaTeX) and figures rendered from the records of a run."""
