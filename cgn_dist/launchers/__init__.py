"""What starts a training loop: the task -> loop table and the Ray Train launcher (above the loops:
the loops only receive a reporter).
"""
