// unbake_editor_snapshot: the plugin's processor and editor (the same Source files as the VST3) in a
// console program. It prepares the processor as a host would (which opens a session with the engine
// at the endpoint), opens the editor, lets its 4 Hz timer run on the message loop, writes the editor
// as a PNG (Component::createComponentSnapshot: no window, no window manager) and prints one JSON
// line: the engine status the editor shows, the stems it dims and the image's size.
//
//   unbake_editor_snapshot --out editor.png [--endpoint ipc://...] [--rate 44100] [--channels 2]
//       [--block 512] [--realtime] [--settle-ms 600] [--wait-s 60] [--scale 1] [--set vocals_gain_db=-6]...
//       [--type endpoint=ipc://...] [--type engine_command="unbake serve"]
//
// --set: a parameter, before the editor opens. --type: once the editor is open, the text typed into
// its field (component ID "endpoint" or "engine_command") followed by Return, as a user would.
//
// Without --endpoint the processor's default applies ($UNBAKE_ENDPOINT, else the per-user socket).
// --realtime: prepared as a real-time host (the reported latency adds one block); default: offline,
// as pedalboard renders. Exit status 0 when the PNG was written, 2 on bad arguments, 1 otherwise.
// JUCE opens an X display when it needs one: run it under Xvfb (xvfb-run -a) on a machine without one.
#include "PluginEditor.h"
#include "PluginProcessor.h"

#include <juce_audio_processors/juce_audio_processors.h>

#include <iostream>

namespace
{
int usage (const juce::String& why)
{
    std::cerr << "unbake_editor_snapshot: " << why << "\n"
              << "usage: unbake_editor_snapshot --out FILE.png [--endpoint E] [--rate HZ] [--channels 1|2] [--block N]\n"
                 "       [--realtime] [--settle-ms MS] [--wait-s S] [--scale F] [--set PARAM=VALUE]...\n"
                 "       [--type FIELD=TEXT]...\n";
    return 2;
}

juce::var statusJson (const unbake::EngineStatus& st)
{
    auto* o = new juce::DynamicObject();
    o->setProperty ("connected", st.connected);
    o->setProperty ("endpoint", juce::String (st.endpoint));
    o->setProperty ("model", juce::String (st.model));
    o->setProperty ("device", juce::String (st.device));
    o->setProperty ("line", juce::String (st.line));
    juce::Array<juce::var> stems;
    for (const auto& s : st.stems)
        stems.add (juce::String (s));
    o->setProperty ("stems", stems);
    o->setProperty ("latency_samples", st.latencySamples);
    o->setProperty ("sample_rate", st.sampleRate);
    o->setProperty ("late_frames", (juce::int64) st.lateFrames);
    return juce::var (o);
}
} // namespace

int main (int argc, char* argv[])
{
    const juce::StringArray args (argv + 1, argc - 1);
    // "--name value" or "--name=value"; the last one wins
    auto option = [&args] (const juce::String& name) {
        juce::String value;
        for (int i = 0; i < args.size(); ++i)
            if (args[i] == name && i + 1 < args.size())
                value = args[++i];
            else if (args[i].startsWith (name + "="))
                value = args[i].fromFirstOccurrenceOf ("=", false, false);
        return value;
    };
    const auto out = option ("--out");
    if (out.isEmpty())
        return usage ("--out is required");
    const auto endpoint = option ("--endpoint");
    auto number = [&option] (const char* name, double fallback) {
        const auto v = option (name);
        return v.isNotEmpty() ? v.getDoubleValue() : fallback;
    };
    const double rate = number ("--rate", 44100.0), scale = number ("--scale", 1.0);
    const int channels = (int) number ("--channels", 2), block = (int) number ("--block", 512);
    const int settleMs = (int) number ("--settle-ms", 600), waitMs = (int) (1000 * number ("--wait-s", 60));
    const bool realtime = args.contains ("--realtime");
    if (rate <= 0 || block <= 0 || scale <= 0 || (channels != 1 && channels != 2))
        return usage ("bad --rate, --block, --scale or --channels");
    juce::StringArray sets, types;
    for (int i = 0; i + 1 < args.size(); ++i)
        if (args[i] == "--set")
            sets.add (args[++i]);
        else if (args[i] == "--type")
            types.add (args[++i]);

    juce::ScopedJuceInitialiser_GUI gui; // the message manager (message thread = this thread)
    int status = 1;
    {
        auto processor = std::make_unique<unbake::UnbakeProcessor>();
        if (endpoint.isNotEmpty())
            processor->setEndpoint (endpoint);
        for (const auto& s : sets)
        {
            auto* p = processor->parameters().getParameter (s.upToFirstOccurrenceOf ("=", false, false));
            if (p == nullptr)
                return usage ("no parameter " + s.upToFirstOccurrenceOf ("=", false, false));
            p->setValueNotifyingHost (p->getValueForText (s.fromFirstOccurrenceOf ("=", false, false)));
        }
        // as a host prepares a plugin: the layout, the rate, then prepareToPlay (opens the session; bounded)
        const auto set = channels == 1 ? juce::AudioChannelSet::mono() : juce::AudioChannelSet::stereo();
        auto layout = processor->getBusesLayout(); // the main buses; the aux (per-stem) buses off
        layout.inputBuses.getReference (0) = set;
        layout.outputBuses.getReference (0) = set;
        for (int i = 1; i < layout.outputBuses.size(); ++i)
            layout.outputBuses.getReference (i) = juce::AudioChannelSet::disabled();
        if (! processor->setBusesLayout (layout))
            return usage ("the plugin refused " + juce::String (channels) + " channel(s)");
        processor->setNonRealtime (! realtime);
        processor->setRateAndBufferSizeDetails (rate, block);
        processor->prepareToPlay (rate, block);

        std::unique_ptr<juce::AudioProcessorEditor> editor (processor->createEditorIfNeeded());
        auto* unbakeEditor = dynamic_cast<unbake::UnbakeEditor*> (editor.get());
        if (unbakeEditor == nullptr)
        {
            std::cerr << "unbake_editor_snapshot: the processor made no UnbakeEditor\n";
            return 1;
        }

        for (const auto& t : types)
        {
            const auto id = t.upToFirstOccurrenceOf ("=", false, false);
            auto* field = dynamic_cast<juce::TextEditor*> (editor->findChildWithID (id));
            if (field == nullptr)
                return usage ("the editor has no text field " + id);
            field->setText (t.fromFirstOccurrenceOf ("=", false, false), true);
            field->keyPressed (juce::KeyPress (juce::KeyPress::returnKey));
        }

        // the editor's own timer refreshes it on this message loop; the snapshot once it has run for
        // settleMs and the engine is connected (or waitMs has passed)
        const auto start = juce::Time::getMillisecondCounter();
        struct Poll final : juce::Timer
        {
            std::function<void()> tick;
            void timerCallback() override { tick(); }
        } poll;
        poll.tick = [&] {
            const auto elapsed = (int) (juce::Time::getMillisecondCounter() - start);
            if (elapsed < settleMs || (! unbakeEditor->shownStatus().connected && elapsed < waitMs))
                return;
            poll.stopTimer();
            unbakeEditor->refresh();
            const auto image = editor->createComponentSnapshot (editor->getLocalBounds(), true, (float) scale);
            juce::File file = juce::File::getCurrentWorkingDirectory().getChildFile (out);
            file.getParentDirectory().createDirectory();
            file.deleteFile();
            bool written = false;
            {
                juce::FileOutputStream stream (file);
                juce::PNGImageFormat png;
                written = stream.openedOk() && png.writeImageToStream (image, stream);
            }
            auto json = statusJson (unbakeEditor->shownStatus());
            juce::Array<juce::var> dimmed;
            auto* tooltips = new juce::DynamicObject();
            auto* rows = new juce::DynamicObject(); // [x, y, w, h] in the PNG's pixels (at --scale 1)
            for (int s = 0; s < (int) unbake::kStemNames.size(); ++s)
            {
                const juce::String name (unbake::kStemNames[(size_t) s]);
                if (unbakeEditor->stemDimmed (s))
                    dimmed.add (name);
                tooltips->setProperty (name, unbakeEditor->stemTooltip (s));
                const auto r = unbakeEditor->stemRowBounds (s);
                rows->setProperty (name, juce::Array<juce::var> { r.getX(), r.getY(), r.getWidth(), r.getHeight() });
            }
            auto* o = json.getDynamicObject();
            o->setProperty ("dimmed", dimmed);
            o->setProperty ("stem_tooltips", juce::var (tooltips));
            o->setProperty ("stem_rows", juce::var (rows));
            o->setProperty ("editor_width", editor->getWidth());
            o->setProperty ("editor_height", editor->getHeight());
            o->setProperty ("png", file.getFullPathName());
            o->setProperty ("png_width", image.getWidth());
            o->setProperty ("png_height", image.getHeight());
            o->setProperty ("written", written);
            o->setProperty ("endpoint_setting", processor->endpointSetting());
            o->setProperty ("engine_command_setting", processor->engineCommandSetting());
            if (auto* model = dynamic_cast<juce::ComboBox*> (editor->findChildWithID ("model")))
                o->setProperty ("model_shown", model->getText());
            std::cout << juce::JSON::toString (json, true) << std::endl;
            status = written ? 0 : 1;
            juce::MessageManager::getInstance()->stopDispatchLoop();
        };
        poll.startTimer (50);
        juce::MessageManager::getInstance()->runDispatchLoop();

        editor.reset(); // before its processor
        processor->releaseResources();
    }
    return status;
}
