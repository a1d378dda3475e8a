"""Plans by tier for pull requests and merges: which partitions a change touches, the commits
behind it, and the one summary check per commit."""
