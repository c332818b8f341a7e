"""`visionserve hub`: the retired Image Analysis 4.0 model-customization REST API over many models served by
name (serving.hub.app), with its state in a folder (state), trainings within a budget (training, jobs),
Ray Serve model multiplexing (models) and the API's conventions (api)."""
