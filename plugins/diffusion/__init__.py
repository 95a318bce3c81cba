"""Built-in diffusion pipeline plugin: any diffusers pipeline folder, run through diffusers.
Imported at start-up, so it stays light; diffusers loads only when a pipeline is."""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_diffusion_pipelines(register):
    register("diffusers", "kvyard_plugins.diffusion.diffusers_pipeline:DiffusersPipeline")
