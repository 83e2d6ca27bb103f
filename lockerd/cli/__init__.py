"""Command-line entry points: the lockerd daemon and the lockerctl backend tool."""
