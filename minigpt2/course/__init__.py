"""The course's graders: the project's own checks run on a learner's function."""
