"""The Ray layer: Ray Train workers, Ray Tune sweeps, a local or cluster Ray, Ray Jobs.

Nothing in the core imports this package; it implements the core's `softprompt.job.Trainer`
protocol on Ray and is imported only when a run goes through Ray.
"""
