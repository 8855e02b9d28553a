"""Applications built on the library: training, launch, data, inference, reports, tuning and planning
commands, the demo. `import flexmoe` never loads this package."""
