// The editor: model, per-stem gain and mute, engine status. (A stub until the real editor lands.)
#pragma once

#include <juce_audio_processors/juce_audio_processors.h>

namespace unbake
{
class UnbakeProcessor;

juce::AudioProcessorEditor* createUnbakeEditor (UnbakeProcessor& processor);
} // namespace unbake
