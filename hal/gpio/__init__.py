"""GPIO backends: solenoid locks and switch inputs over RPi.GPIO or gpiod, and a matrix keypad."""
