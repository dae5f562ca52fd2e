"""Which raw files the project reads, by suffix: preprocessing finds its inputs with these, and prediction
tells a video from an image with them, so a file one side accepts the other does too."""

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
