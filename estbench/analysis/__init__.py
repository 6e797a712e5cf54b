"""Layer 4, analysis: per-cell figures, statistics, leaderboards, compare, rank."""
