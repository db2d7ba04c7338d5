"""RECAP: rewards, returns, the distributional value function, advantages and advantage-conditioned training."""
