"""Models sipit ships or builds: the built-in zoo, our Ouro looped model, Kimi Linear configs."""
